"""Mutual TLS in the shared runtime: the local CA, the caller matrix by identity, and certificate reload."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshserve.billing.v1 import billing_pb2, billing_pb2_grpc
from services.runtime import callers, tls
from services.runtime.interceptors import ServiceInterceptor


class _Billing(billing_pb2_grpc.BillingServiceServicer):
    async def GetUsage(self, request: Any, context: Any) -> billing_pb2.GetUsageResponse:
        return billing_pb2.GetUsageResponse(currency="USD")


@pytest.fixture
async def billing(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A server with the runtime's interceptor, serving as `billing` over mutual TLS."""
    files = tls.issue(tmp_path / "ca", "billing")
    server = aio.server(interceptors=[ServiceInterceptor("billing", identities=True)])
    billing_pb2_grpc.add_BillingServiceServicer_to_server(_Billing(), server)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(files))
    await server.start()
    yield f"127.0.0.1:{port}", tmp_path / "ca"
    await server.stop(0)


async def _usage(target: str, files: tls.Files | None, credentials: grpc.ChannelCredentials | None = None) -> str:
    """The status name of a GetUsage call (OK when it succeeds)."""
    if credentials is not None:
        channel = aio.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", "billing")])
    else:
        channel = tls.aio_channel(target, files, "billing")
    async with channel:
        try:
            await billing_pb2_grpc.BillingServiceStub(channel).GetUsage(billing_pb2.GetUsageRequest(), timeout=5)
        except aio.AioRpcError as exc:
            return exc.code().name
    return "OK"


def test_certificates_carry_the_identity_and_keys_stay_private(tmp_path: Path) -> None:
    files = tls.issue(tmp_path, "router")
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://meshserve.local/router"]
    assert "router" in names.get_values_for_type(x509.DNSName)
    for key in (files.key, tmp_path / "ca-key.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # The layout of a mounted Kubernetes Secret: one link swap replaces all three files.
    assert files == tls.Files.of(tmp_path / "router") and (tmp_path / "router" / "..data").is_symlink()
    assert files.ca.read_bytes() == (tmp_path / "ca.pem").read_bytes()
    # Issued once: a second start keeps what is there and fresh.
    assert tls.issue(tmp_path, "router").cert.read_bytes() == files.cert.read_bytes()


async def test_the_caller_matrix_is_enforced_by_certificate(billing: tuple[str, Path]) -> None:
    target, ca = billing
    assert await _usage(target, tls.issue(ca, "edge")) == "OK"
    assert await _usage(target, tls.issue(ca, "admin")) == "OK"
    # A router records usage; it may not read it.
    assert await _usage(target, tls.issue(ca, "router")) == "PERMISSION_DENIED"
    assert callers.allowed("/meshserve.billing.v1.BillingService/RecordUsage") == frozenset({"router"})


async def test_callers_without_a_mesh_certificate_are_refused(billing: tuple[str, Path], tmp_path: Path) -> None:
    target, ca = billing
    # Plaintext to a TLS port, TLS without a client certificate, a certificate from another CA.
    assert await _usage(target, None) == "UNAVAILABLE"
    trusting = grpc.ssl_channel_credentials(root_certificates=(ca / "ca.pem").read_bytes())
    assert await _usage(target, None, trusting) == "UNAVAILABLE"
    assert await _usage(target, tls.issue(tmp_path / "other", "edge")) == "UNAVAILABLE"


async def test_health_is_open_to_any_mesh_identity(billing: tuple[str, Path]) -> None:
    target, ca = billing
    async with tls.aio_channel(target, tls.issue(ca, "router"), "billing") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_replaced_certificate_is_served_without_a_restart(billing: tuple[str, Path]) -> None:
    target, ca = billing
    old_client = tls.issue(ca, "edge")
    old = old_client.read()
    # A new CA, then the server's certificate issued again under it (one swap of its folder): only a
    # server that re-read its files accepts a client of the new CA, and refuses one of the old.
    (ca / "ca.pem").unlink()
    tls.issue(ca, "billing")
    new_client = tls.issue(ca, "edge")
    assert new_client.read() != old
    assert await _usage(target, new_client) == "OK"
    stale = tmp = ca.parent / "stale"
    stale.mkdir()
    for data, name in zip(old, ("tls.crt", "tls.key", "ca.crt"), strict=True):
        (tmp / name).write_bytes(data)
    assert await _usage(target, tls.Files.of(stale)) == "UNAVAILABLE"


async def test_a_client_calls_with_its_renewed_certificate_and_calls_under_way_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls, "RECHECK_SECONDS", 0.0)
    seen: list[bytes] = []

    class Recording(billing_pb2_grpc.BillingServiceServicer):
        async def GetUsage(self, request: Any, context: Any) -> billing_pb2.GetUsageResponse:
            seen.append(context.auth_context()["x509_pem_cert"][0])
            if request.tenant == "slow":
                await asyncio.sleep(0.5)
            return billing_pb2.GetUsageResponse(currency="USD")

    server = aio.server()
    billing_pb2_grpc.add_BillingServiceServicer_to_server(Recording(), server)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(tls.issue(tmp_path / "ca", "billing")))
    await server.start()
    client = tls.issue(tmp_path / "ca", "router")
    channel = tls.MeshChannel(f"127.0.0.1:{port}", client, "billing", billing_pb2_grpc.BillingServiceStub)
    try:
        first = client.cert.read_bytes()
        under_way = asyncio.ensure_future(channel.stub.GetUsage(billing_pb2.GetUsageRequest(tenant="slow"), timeout=5))
        await asyncio.sleep(0.1)
        tls.issue(tmp_path / "ca", "router", renew=True)  # what cert-manager's renewal does to the mounted files
        await channel.stub.GetUsage(billing_pb2.GetUsageRequest(), timeout=5)
        assert (await under_way).currency == "USD"  # made on the old channel, which closes once it is done
        assert seen[0].strip() == first.strip()
        assert seen[1].strip() == client.cert.read_bytes().strip() != first.strip()
    finally:
        await channel.close()
        await server.stop(0)
