"""The key store and its cache over their Redis, as an auth replica and a router build them alike."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from services.auth.authenticator import Authenticator
from services.auth.store import KeyStore
from services.runtime import redis_tls, tls


@dataclass
class Keys:
    """An Authenticator on the key store, with the Redis clients it owns and the task that follows changes."""

    authenticator: Authenticator
    store: KeyStore
    client: redis.Redis
    listener: redis.Redis
    _follower: list[asyncio.Task[None]] = field(default_factory=list, init=False)

    async def ready(self) -> None:
        """Returns once Redis answers and the cache hears of every change (until then it answers nothing)."""
        await redis_tls.answering(self.client)
        self._follower.append(asyncio.create_task(self.authenticator.follow_changes(self.listener)))
        await asyncio.wait_for(self.authenticator.subscribed.wait(), timeout=10)

    async def close(self) -> None:
        for task in self._follower:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.client.aclose()
        await self.listener.aclose()


def open_keys(
    redis_url: str,
    files: tls.Files | None,
    cache_entries: int,
    cache_max_age_seconds: float,
    outage_grace_seconds: float,
) -> Keys:
    """The key store on redis_url (mutual TLS with files on a rediss:// URL) and its in-process cache (the
    settings' meanings: services/auth/config.py)."""
    # Well inside Envoy's 1 s for a check: an unreachable Redis is noticed in time for the cache to answer.
    # A broken pooled connection is retried once on a fresh one (after a Redis restart), nothing else.
    client = redis.Redis.from_url(
        redis_url,
        **redis_tls.options(redis_url, files),
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    # Pub/sub holds its connection open indefinitely: no read timeout on it.
    listener = redis.Redis.from_url(redis_url, socket_connect_timeout=2, **redis_tls.options(redis_url, files))
    store = KeyStore(client)
    authenticator = Authenticator(
        store, cache_entries, cache_max_age_seconds, outage_grace_seconds=outage_grace_seconds
    )
    return Keys(authenticator, store, client, listener)
