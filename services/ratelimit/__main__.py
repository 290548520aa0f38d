"""Runs a rate-limit replica: python -m services.ratelimit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as redis
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from meshserve.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc
from services.ratelimit.config import RateLimitSettings
from services.ratelimit.limiter import Limiter
from services.ratelimit.rules import Rules
from services.ratelimit.servicers import RateLimitServicer, TokenBudgetServicer
from services.ratelimit.windows import SlidingWindows
from services.runtime import redis_tls
from services.runtime.server import Runtime, serve
from services.runtime.watched import WatchedFile

SERVICES = [
    rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name,
    ratelimit_pb2.DESCRIPTOR.services_by_name["TokenBudgetService"].full_name,
]


def main() -> None:
    settings = RateLimitSettings()

    async def setup(rt: Runtime) -> None:
        rules = WatchedFile(Path(settings.rules), Rules.from_yaml, "rate-limit rules")
        # A decision never waits on a sick Redis: a short timeout and no retry of one, then the failure mode.
        # A broken connection is retried once, on a fresh one: after a Redis restart every pooled
        # connection is stale, and each would otherwise fail one decision open.
        client = redis.Redis.from_url(
            settings.redis_url,
            **redis_tls.options(settings.redis_url, rt.tls),
            socket_timeout=settings.redis_timeout_seconds,
            socket_connect_timeout=settings.redis_timeout_seconds,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        limiter = Limiter(lambda: rules.current, SlidingWindows(client))
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitServicer(limiter, settings.domain), rt.server)
        ratelimit_pb2_grpc.add_TokenBudgetServiceServicer_to_server(TokenBudgetServicer(limiter), rt.server)
        watcher = asyncio.create_task(rules.follow(settings.rules_poll_seconds))

        async def ready() -> None:
            await client.ping()

        async def close() -> None:
            watcher.cancel()
            await client.aclose()

        rt.warm_up_with(ready)
        rt.on_shutdown(close)

    serve("ratelimit", settings, SERVICES, setup)


if __name__ == "__main__":
    main()
