"""Decides requests from an in-process cache of keys, kept correct by the store's change channel."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as redis
from prometheus_client import Counter
from redis.exceptions import RedisError

from services.auth.keys import Grant, KeyRecord, decide, hash_secret, parse_bearer
from services.auth.store import CHANGES, KeyStore
from services.runtime.errors import Unavailable

log = logging.getLogger(__name__)

STALE_DECISIONS = Counter(
    "meshserve_auth_outage_decisions_total",
    "Checks while the key store was unreachable: answered from the cache (cached) or refused (refused).",
    ["outcome"],
)


@dataclass
class _Entry:
    grant: Grant | None
    fetched_at: float


class Authenticator:
    """Resolves bearer secrets to keys. A known secret costs a hash and a dict lookup, no Redis."""

    def __init__(
        self,
        store: KeyStore,
        max_entries: int = 100_000,
        max_age_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
        outage_grace_seconds: float = 60.0,
    ) -> None:
        self._store = store
        self._max_entries = max_entries
        # A safety net only: changes arrive on the channel within milliseconds.
        self._max_age = max_age_seconds
        self._clock = clock
        # How long into a Redis outage keys already in the cache still answer (0: refuse at once).
        self._outage_grace = outage_grace_seconds
        # When the key store became unreachable; None while it answers.
        self._outage_since: float | None = None
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._by_key: dict[str, set[str]] = {}
        self.subscribed = asyncio.Event()

    async def check(self, authorization: str | None, admin_call: bool = False) -> KeyRecord:
        """The key the caller runs as, or Unauthenticated / PermissionDenied / Unavailable."""
        secret_hash = hash_secret(parse_bearer(authorization))
        now = self._clock()
        entry = self._cache.get(secret_hash)
        if entry is None or now - entry.fetched_at > self._max_age or not self.subscribed.is_set():
            try:
                fetched = _Entry(await self._store.lookup(secret_hash), now)
            except Unavailable:
                entry = self._during_outage(entry, now)
            else:
                self._recovered()
                entry = fetched
                self._remember(secret_hash, entry)
        else:
            self._cache.move_to_end(secret_hash)
        return decide(entry.grant, now, admin_call)

    def _during_outage(self, cached: _Entry | None, now: float) -> _Entry:
        """The cached entry while the outage is younger than the grace window; else the outage is the answer."""
        if self._outage_since is None:
            self._outage_since = now
            log.warning(
                "key store unreachable; answering from the cache for keys checked before",
                extra={"grace_seconds": self._outage_grace},
            )
        if cached is None or self._outage_grace <= 0 or now - self._outage_since > self._outage_grace:
            STALE_DECISIONS.labels("refused").inc()
            raise Unavailable("the key store is unreachable and this key was not checked recently")
        STALE_DECISIONS.labels("cached").inc()
        return cached

    def _recovered(self) -> None:
        if self._outage_since is not None:
            log.warning("key store reachable again", extra={"seconds": round(self._clock() - self._outage_since, 1)})
            self._outage_since = None

    def _remember(self, secret_hash: str, entry: _Entry) -> None:
        self._cache[secret_hash] = entry
        self._cache.move_to_end(secret_hash)
        if entry.grant is not None:
            self._by_key.setdefault(entry.grant.record.key_id, set()).add(secret_hash)
        while len(self._cache) > self._max_entries:
            old_hash, old = self._cache.popitem(last=False)
            if old.grant is not None:
                self._by_key.get(old.grant.record.key_id, set()).discard(old_hash)

    def invalidate(self, key_id: str) -> None:
        """Forgets every cached secret of key_id."""
        for secret_hash in self._by_key.pop(key_id, set()):
            self._cache.pop(secret_hash, None)

    def clear(self) -> None:
        self._cache.clear()
        self._by_key.clear()

    async def follow_changes(self, client: redis.Redis) -> None:
        """Invalidates on every change announced by any replica; runs until cancelled.

        While the subscription is down, changes may be missed: every check goes to Redis until the
        subscription is back (the cache answers only when Redis does not), and the cache is cleared then.
        """
        backoff = 0.1
        while True:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANGES)
                self.clear()
                self.subscribed.set()
                log.info("following key changes")
                backoff = 0.1
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self.invalidate(message["data"].decode())
            except (RedisError, OSError) as exc:
                log.warning(
                    "key change subscription lost; checking every request against Redis",
                    extra={"error": exc.__class__.__name__},
                )
            finally:
                # The cache stays (it answers through an outage); unsubscribed, every check asks Redis
                # first, and the cache is cleared on subscribing again so changes missed meanwhile apply.
                self.subscribed.clear()
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 8
                except (RedisError, OSError):
                    pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
