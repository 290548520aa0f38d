"""The limiter over its Redis and its rules file, as a rate-limit replica and a router build it alike."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from services.billing.prices import Prices
from services.ratelimit.limiter import Limiter
from services.ratelimit.rules import Rules
from services.ratelimit.scripts import Scripts
from services.ratelimit.spend import Spend
from services.ratelimit.windows import SlidingWindows
from services.runtime import redis_tls, tls
from services.runtime.watched import WatchedFile

# Connections one limiter keeps to Redis at most (a request's token and spend decisions run at once).
MAX_CONNECTIONS = 256


@dataclass
class Limits:
    """A Limiter with the scripts on the Redis client and the followed rules file it owns."""

    limiter: Limiter
    scripts: Scripts
    rules: WatchedFile[Rules]
    prices: WatchedFile[Prices] | None = None
    _watchers: list[asyncio.Task[None]] = field(default_factory=list, init=False)

    def follow(self, poll_seconds: float) -> None:
        """Reloads the rules (and the price table) when their files change, until close()."""
        files: list[WatchedFile[Any]] = [self.rules] if self.prices is None else [self.rules, self.prices]
        self._watchers = [asyncio.create_task(f.follow(poll_seconds)) for f in files]

    async def ready(self) -> None:
        await redis_tls.answering(self.scripts.redis)

    async def close(self) -> None:
        for watcher in self._watchers:
            watcher.cancel()
        await self.scripts.close()
        await self.scripts.redis.aclose()


def open_limits(
    redis_url: str,
    rules: Path,
    files: tls.Files | None,
    timeout_seconds: float,
    prices: Path | None = None,
    settle_delay_seconds: float = 0.0,
) -> Limits:
    """The limiter on redis_url (mutual TLS with files on a rediss:// URL) under the rules file; spend budgets
    priced by the price table, where one is given; settlements batched over up to settle_delay_seconds
    (scripts.py)."""
    watched = WatchedFile(rules, Rules.from_yaml, "rate-limit rules")
    # A decision never waits on a sick Redis: a short timeout and no retry of one, then the failure mode.
    # A broken connection is retried once, on a fresh one: after a Redis restart every pooled
    # connection is stale, and each would otherwise fail one decision open.
    # A burst of decisions waits (within the decision's timeout) for a pooled connection: redis-py's default pool
    # refuses past 100 connections, and a refused call reads as Redis unreachable (the failure mode).
    pool = redis.BlockingConnectionPool.from_url(
        redis_url,
        **redis_tls.options(redis_url, files),
        max_connections=MAX_CONNECTIONS,
        timeout=timeout_seconds,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    client = redis.Redis(connection_pool=pool)
    scripts = Scripts(client, settle_delay_seconds)
    spend, table = None, None
    if prices is not None:
        table = WatchedFile(prices, Prices.from_yaml, "price table")
        spend = Spend(scripts, lambda: table.current)
    limiter = Limiter(lambda: watched.current, SlidingWindows(scripts), spend)
    return Limits(limiter, scripts, watched, table)
