"""Runs an auth replica: python -m services.auth."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import redis.asyncio as redis
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from meshserve.auth.v1 import auth_pb2, auth_pb2_grpc
from services.auth.authenticator import Authenticator
from services.auth.bootstrap import ensure_admin, ensure_admin_secret
from services.auth.config import AuthSettings
from services.auth.servicers import AdminServicer, ExtAuthzServicer
from services.auth.store import KeyStore
from services.runtime import redis_tls
from services.runtime.server import Runtime, serve

SERVICES = [
    auth_pb2.DESCRIPTOR.services_by_name["AuthAdminService"].full_name,
    external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
]


def main() -> None:
    settings = AuthSettings()

    async def setup(rt: Runtime) -> None:
        # Well inside Envoy's 1 s for a check: an unreachable Redis is noticed in time for the cache to answer.
        # A broken pooled connection is retried once on a fresh one (after a Redis restart), nothing else.
        client = redis.Redis.from_url(
            settings.redis_url,
            **redis_tls.options(settings.redis_url, rt.tls),
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        # Pub/sub holds its connection open indefinitely: no read timeout on it.
        listener = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=2, **redis_tls.options(settings.redis_url, rt.tls)
        )
        store = KeyStore(client)
        authenticator = Authenticator(
            store,
            settings.cache_entries,
            settings.cache_max_age_seconds,
            outage_grace_seconds=settings.outage_grace_seconds,
        )
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(ExtAuthzServicer(authenticator), rt.server)
        auth_pb2_grpc.add_AuthAdminServiceServicer_to_server(AdminServicer(authenticator, store), rt.server)
        follower: list[asyncio.Task[None]] = []

        async def ready() -> None:
            await redis_tls.answering(client)
            follower.append(asyncio.create_task(authenticator.follow_changes(listener)))
            await asyncio.wait_for(authenticator.subscribed.wait(), timeout=10)
            if settings.bootstrap_admin_secret:
                await ensure_admin_secret(store, settings.bootstrap_admin_secret)
            if settings.bootstrap_admin_file:
                await ensure_admin(store, Path(settings.bootstrap_admin_file))

        async def close() -> None:
            for task in follower:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await client.aclose()
            await listener.aclose()

        rt.warm_up_with(ready)
        rt.on_shutdown(close)

    serve("auth", settings, SERVICES, setup)


if __name__ == "__main__":
    main()
