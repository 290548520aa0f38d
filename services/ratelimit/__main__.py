"""Runs a rate-limit replica: python -m services.ratelimit."""

from __future__ import annotations

from pathlib import Path

from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from meshserve.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc
from services.ratelimit.build import open_limits
from services.ratelimit.config import RateLimitSettings
from services.ratelimit.servicers import RateLimitServicer, TokenBudgetServicer
from services.runtime.server import Runtime, serve

SERVICES = [
    rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name,
    ratelimit_pb2.DESCRIPTOR.services_by_name["TokenBudgetService"].full_name,
]


def main() -> None:
    settings = RateLimitSettings()

    async def setup(rt: Runtime) -> None:
        prices = Path(settings.prices) if settings.prices else None
        limits = open_limits(settings.redis_url, Path(settings.rules), rt.tls, settings.redis_timeout_seconds, prices)
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(
            RateLimitServicer(limits.limiter, settings.domain), rt.server
        )
        ratelimit_pb2_grpc.add_TokenBudgetServiceServicer_to_server(TokenBudgetServicer(limits.limiter), rt.server)
        limits.follow(settings.rules_poll_seconds)
        rt.warm_up_with(limits.ready)
        rt.on_shutdown(limits.close)

    serve("ratelimit", settings, SERVICES, setup)


if __name__ == "__main__":
    main()
