"""The floor of one Python gRPC hop: a grpc.aio server that allows every ext_authz Check and every
ShouldRateLimit and does nothing else (no Redis, no interceptor, no parsing of the request).

Benchmarks put it where the auth or rate-limit service would be, or drive it directly: what it costs is
what any service on Python grpcio costs before it does its own work, measured in the same run.
Run as a mesh service: `python -m bench.floor`, port from MESHSERVE_PORT (0 picks one), bound port
written to MESHSERVE_READY_FILE as the shared runtime does.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ratelimit.v3 import rls_pb2

from services.mesh.local import LocalMesh, Proc
from services.runtime import files, tls
from services.runtime.settings import ServiceSettings

CHECK = "/envoy.service.auth.v3.Authorization/Check"
SHOULD_RATE_LIMIT = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
# The same bytes for every call: allowed.
ALLOW = {
    CHECK: external_auth_pb2.CheckResponse(ok_response=external_auth_pb2.OkHttpResponse()).SerializeToString(),
    SHOULD_RATE_LIMIT: rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK).SerializeToString(),
}


def start(mesh: LocalMesh, name: str) -> Proc:
    """Starts the floor as mesh's service `name` (e.g. "auth", so that the edge calls it) and waits until bound."""
    proc = mesh.start_service(name, __name__, "MESHSERVE_", kind=name)
    mesh.wait_bound(proc, 30)
    return proc


async def serve(port: int, ready_file: str) -> None:
    server = grpc.aio.server()
    for method, reply in ALLOW.items():
        service, name = method.lstrip("/").split("/")

        async def allow(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes], reply: bytes = reply) -> bytes:
            return reply

        # No (de)serializers: bytes in, bytes out.
        handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(allow)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {name: handler}),))
    address = f"{os.environ.get('MESHSERVE_HOST', '127.0.0.1')}:{port}"
    # As the real services: mutual TLS with the identity the mesh gave it, if it gave one.
    certs = ServiceSettings().tls_files()
    bound = (
        server.add_secure_port(address, tls.server_credentials(certs)) if certs else server.add_insecure_port(address)
    )
    await server.start()
    if ready_file:
        files.write_ready(Path(ready_file), bound, 0, certs is not None)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(os.environ.get("MESHSERVE_PORT", "0")), os.environ.get("MESHSERVE_READY_FILE", "")))
