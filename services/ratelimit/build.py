"""The limiter over its Redis and its rules file, as a rate-limit replica and a router build it alike."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from services.ratelimit.limiter import Limiter
from services.ratelimit.rules import Rules
from services.ratelimit.windows import SlidingWindows
from services.runtime import redis_tls, tls
from services.runtime.watched import WatchedFile


@dataclass
class Limits:
    """A Limiter with the Redis client and the followed rules file it owns."""

    limiter: Limiter
    client: redis.Redis
    rules: WatchedFile[Rules]
    _watcher: asyncio.Task[None] | None = field(default=None, init=False)

    def follow(self, poll_seconds: float) -> None:
        """Reloads the rules when their file changes, until close()."""
        self._watcher = asyncio.create_task(self.rules.follow(poll_seconds))

    async def ready(self) -> None:
        await redis_tls.answering(self.client)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        await self.client.aclose()


def open_limits(redis_url: str, rules: Path, files: tls.Files | None, timeout_seconds: float) -> Limits:
    """The limiter on redis_url (mutual TLS with files on a rediss:// URL) under the rules file."""
    watched = WatchedFile(rules, Rules.from_yaml, "rate-limit rules")
    # A decision never waits on a sick Redis: a short timeout and no retry of one, then the failure mode.
    # A broken connection is retried once, on a fresh one: after a Redis restart every pooled
    # connection is stale, and each would otherwise fail one decision open.
    client = redis.Redis.from_url(
        redis_url,
        **redis_tls.options(redis_url, files),
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    return Limits(Limiter(lambda: watched.current, SlidingWindows(client)), client, watched)
