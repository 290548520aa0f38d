"""Keys in Redis: records by id, secret hashes to ids, and a channel that announces every change."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError, WatchError

from services.auth.keys import Grant, KeyRecord, hash_secret, new_key_id, new_secret
from services.runtime.errors import NotFound, Unavailable, echo

log = logging.getLogger(__name__)

CHANGES = "msk:changes"


def _record_key(key_id: str) -> str:
    return f"msk:key:{key_id}"


def _secret_key(secret_hash: str) -> str:
    return f"msk:secret:{secret_hash}"


_INDEX = "msk:keys"


class KeyStore:
    """The durable side of auth. Every write publishes the key id on CHANGES."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    async def lookup(self, secret_hash: str) -> Grant | None:
        """The key a secret hash belongs to, or None; one round trip for the hash, one for the record."""
        try:
            raw = await self._redis.get(_secret_key(secret_hash))
            if raw is None:
                return None
            entry = json.loads(raw)
            record_raw = await self._redis.get(_record_key(entry["key_id"]))
        except RedisError as exc:
            raise Unavailable(f"the key store is unreachable: {exc.__class__.__name__}") from exc
        if record_raw is None:
            return None
        return Grant(KeyRecord.from_json(record_raw), entry.get("not_after"))

    async def get(self, key_id: str) -> KeyRecord:
        raw = await self._call(self._redis.get(_record_key(key_id)))
        if raw is None:
            raise NotFound(f"key {echo(key_id)} does not exist")
        return KeyRecord.from_json(raw)

    async def list(self, tenant: str = "", include_revoked: bool = False) -> list[KeyRecord]:
        ids = await self._call(self._redis.zrange(_INDEX, 0, -1))
        if not ids:
            return []
        raws = await self._call(self._redis.mget([_record_key(i.decode()) for i in ids]))
        records = [KeyRecord.from_json(r) for r in raws if r is not None]
        return [r for r in records if (not tenant or r.tenant == tenant) and (include_revoked or r.revoked_at is None)]

    async def create(self, template: KeyRecord) -> tuple[KeyRecord, str]:
        """Stores a new key built from template (its id and secret are made here); returns the secret once."""
        secret = new_secret()
        return await self.create_with_secret(template, secret), secret

    async def create_with_secret(self, template: KeyRecord, secret: str) -> KeyRecord:
        """Stores a new key with a given secret (bootstrap from an operator's Secret)."""
        record = replace(template, key_id=new_key_id(), created_at=time.time(), secret_hashes=()).with_secret(secret)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(_record_key(record.key_id), record.to_json())
            pipe.set(_secret_key(hash_secret(secret)), json.dumps({"key_id": record.key_id}))
            pipe.zadd(_INDEX, {record.key_id: record.created_at})
            pipe.publish(CHANGES, record.key_id)
            await self._call(pipe.execute())
        return record

    async def rotate(self, key_id: str, grace_seconds: float) -> tuple[KeyRecord, str, float]:
        """A new current secret; the previous one works until now + grace, then its hash is deleted."""
        secret = new_secret()
        not_after = time.time() + grace_seconds

        async def apply(pipe: redis.client.Pipeline) -> tuple[KeyRecord, str, float]:
            raw = await pipe.get(_record_key(key_id))
            if raw is None:
                raise NotFound(f"key {echo(key_id)} does not exist")
            old = KeyRecord.from_json(raw)
            if old.revoked_at is not None:
                raise NotFound(f"key {echo(key_id)} was revoked")
            record = replace(old, secret_hashes=old.secret_hashes[:1]).with_secret(secret)
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.set(_record_key(key_id), record.to_json())
            pipe.set(_secret_key(hash_secret(secret)), json.dumps({"key_id": key_id}))
            for stale in old.secret_hashes[1:]:
                pipe.delete(_secret_key(stale))
            if old.secret_hashes:
                previous = _secret_key(old.secret_hashes[0])
                if grace_seconds > 0:
                    pipe.set(previous, json.dumps({"key_id": key_id, "not_after": not_after}))
                    pipe.expireat(previous, int(not_after) + 1)
                else:
                    pipe.delete(previous)
            pipe.publish(CHANGES, key_id)
            return record, secret, not_after

        rotated: tuple[KeyRecord, str, float] = await self._transaction(key_id, apply)
        return rotated

    async def revoke(self, key_id: str) -> KeyRecord:
        """Marks the key revoked and deletes every secret hash it had."""

        async def apply(pipe: redis.client.Pipeline) -> KeyRecord:
            raw = await pipe.get(_record_key(key_id))
            if raw is None:
                raise NotFound(f"key {echo(key_id)} does not exist")
            old = KeyRecord.from_json(raw)
            record = replace(old, revoked_at=old.revoked_at or time.time(), secret_hashes=())
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.set(_record_key(key_id), record.to_json())
            for h in old.secret_hashes:
                pipe.delete(_secret_key(h))
            pipe.publish(CHANGES, key_id)
            return record

        record: KeyRecord = await self._transaction(key_id, apply)
        return record

    async def update(self, key_id: str, change: Callable[[KeyRecord], KeyRecord]) -> KeyRecord:
        """Replaces the key's record with change(record); every replica's cache drops the old one."""

        async def apply(pipe: redis.client.Pipeline) -> KeyRecord:
            raw = await pipe.get(_record_key(key_id))
            if raw is None:
                raise NotFound(f"key {echo(key_id)} does not exist")
            record = change(KeyRecord.from_json(raw))
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.set(_record_key(key_id), record.to_json())
            pipe.publish(CHANGES, key_id)
            return record

        record: KeyRecord = await self._transaction(key_id, apply)
        return record

    async def _transaction(self, key_id: str, apply: Callable[[redis.client.Pipeline], Awaitable[object]]) -> Any:
        for _ in range(10):
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    await pipe.watch(_record_key(key_id))
                    result = await apply(pipe)
                    await pipe.execute()
                    return result
            except WatchError:
                continue
            except RedisError as exc:
                raise Unavailable(f"the key store is unreachable: {exc.__class__.__name__}") from exc
        raise Unavailable(f"key {echo(key_id)} is being changed concurrently; try again")

    async def _call(self, awaitable: Awaitable[object]) -> Any:
        try:
            return await awaitable
        except RedisError as exc:
            raise Unavailable(f"the key store is unreachable: {exc.__class__.__name__}") from exc
