"""Runs an auth replica: python -m services.auth."""

from __future__ import annotations

from pathlib import Path

from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from meshserve.auth.v1 import auth_pb2, auth_pb2_grpc
from services.auth.bootstrap import ensure_admin, ensure_admin_secret
from services.auth.build import open_keys
from services.auth.config import AuthSettings
from services.auth.servicers import AdminServicer, ExtAuthzServicer
from services.runtime.server import Runtime, serve

SERVICES = [
    auth_pb2.DESCRIPTOR.services_by_name["AuthAdminService"].full_name,
    external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
]


def main() -> None:
    settings = AuthSettings()

    async def setup(rt: Runtime) -> None:
        keys = open_keys(
            settings.redis_url,
            rt.tls,
            settings.cache_entries,
            settings.cache_max_age_seconds,
            settings.outage_grace_seconds,
        )
        authenticator, store = keys.authenticator, keys.store
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(ExtAuthzServicer(authenticator), rt.server)
        auth_pb2_grpc.add_AuthAdminServiceServicer_to_server(AdminServicer(authenticator, store), rt.server)

        async def ready() -> None:
            await keys.ready()
            if settings.bootstrap_admin_secret:
                await ensure_admin_secret(store, settings.bootstrap_admin_secret)
            if settings.bootstrap_admin_file:
                await ensure_admin(store, Path(settings.bootstrap_admin_file))

        rt.warm_up_with(ready)
        rt.on_shutdown(keys.close)

    serve("auth", settings, SERVICES, setup)


if __name__ == "__main__":
    main()
