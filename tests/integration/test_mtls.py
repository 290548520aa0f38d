"""Mutual TLS inside the local mesh: who may call whom, by certificate; rotation without a dropped request.

The whole mesh (Envoy, auth, rate limits, billing, router) over a scripted replica, as `meshserve up`
runs it: every internal hop over mutual TLS with certificates from the throwaway CA in its state folder.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.billing.v1 import billing_pb2, billing_pb2_grpc
from meshserve.inference.v1 import inference_pb2, inference_pb2_grpc
from meshserve.llm.v1 import llm_pb2, llm_pb2_grpc
from services.mesh.local import LocalMesh, free_port
from services.runtime import redis_tls, tls
from tests.e2e.helpers import served_certificate
from tests.integration import scripted_inference
from tests.integration.bystanders import Bystanders

RULES = Path(__file__).with_name("ratelimits-hardening.yaml")
SERVICES = ("auth", "ratelimit", "billing", "router", "inference")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with scripted_inference.scripted_mesh(tmp_path_factory.mktemp("mtls"), RULES, 3, 0.05) as m:
        yield m


def _health(channel: grpc.Channel) -> str:
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError as exc:
        return str(exc.code().name)  # type: ignore[attr-defined]
    return "OK"


def test_every_service_refuses_a_caller_without_a_mesh_certificate(mesh: LocalMesh, tmp_path: Path) -> None:
    stranger = tls.issue(tmp_path / "other-ca", "edge")  # the right name, from another CA
    ca_only = grpc.ssl_channel_credentials(root_certificates=mesh.identity("edge").ca.read_bytes())  # type: ignore[union-attr]
    for name in SERVICES:
        target = f"127.0.0.1:{mesh.procs[name].grpc_port}"
        with grpc.insecure_channel(target) as plain:
            assert _health(plain) == "UNAVAILABLE", f"{name} answered plaintext"
        options = [("grpc.ssl_target_name_override", name)]
        with grpc.secure_channel(target, ca_only, options=options) as anonymous:
            assert _health(anonymous) == "UNAVAILABLE", f"{name} answered a client without a certificate"
        with tls.channel(target, stranger, name) as foreign:
            assert _health(foreign) == "UNAVAILABLE", f"{name} answered a certificate of another CA"
        with mesh.channel(name, "admin") as ours:
            assert _health(ours) == "OK", f"{name} refused a mesh certificate"


def test_the_plaintext_health_port_answers_probes_and_nothing_else(mesh: LocalMesh) -> None:
    # Kubernetes' gRPC probes cannot present a certificate: they read a health-only plaintext port.
    port = free_port()
    proc = mesh.start_auth("auth-probed", env={"MESHSERVE_AUTH_HEALTH_PORT": str(port)})
    try:
        mesh.wait_serving(proc, 60)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as probe:
            assert _health(probe) == "OK"
            with pytest.raises(grpc.RpcError) as refused:
                CALLS["check"][1](probe)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
        with grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as plain:
            assert _health(plain) == "UNAVAILABLE"  # the service's own port still wants a certificate
    finally:
        mesh.stop_proc(proc)


def test_redis_takes_only_tls_clients_with_a_mesh_certificate(mesh: LocalMesh, tmp_path: Path) -> None:
    port = mesh.procs["redis"].grpc_port
    assert mesh.redis_url == f"rediss://127.0.0.1:{port}/0"
    with redis.Redis(port=port, socket_timeout=2) as plain, pytest.raises(redis.ConnectionError):
        plain.ping()
    ca = str(mesh.identity("admin").ca)  # type: ignore[union-attr]
    with redis.Redis(port=port, ssl=True, ssl_ca_certs=ca, socket_timeout=2) as anonymous:
        with pytest.raises(redis.ConnectionError):
            anonymous.ping()
    stranger = tls.issue(tmp_path / "other-ca", "billing")
    foreign = redis_tls.options(mesh.redis_url, stranger) | {"socket_timeout": 2}
    with redis.Redis.from_url(mesh.redis_url, **foreign) as client, pytest.raises(redis.ConnectionError):
        client.ping()
    with redis.Redis.from_url(mesh.redis_url, **mesh.redis_options("billing")) as ours:
        assert ours.ping()


def _redis_certificate(mesh: LocalMesh) -> bytes:
    files = mesh.identity("admin")
    assert files is not None
    context = ssl.create_default_context(cafile=str(files.ca))
    context.load_cert_chain(str(files.cert), str(files.key))
    return served_certificate(mesh.procs["redis"].grpc_port, context, "127.0.0.1")


def test_redis_serves_a_renewed_certificate_once_told_to_read_its_files_again(mesh: LocalMesh) -> None:
    # What the Kubernetes sidecar does (deploy/k8s/base/redis.yaml): Redis reads its files at start only.
    before = _redis_certificate(mesh)
    renewed = tls.issue(mesh.options.state_dir / "tls", "redis", renew=True)
    with redis.Redis.from_url(mesh.redis_url, **mesh.redis_options()) as client:
        client.config_set("tls-cert-file", str(renewed.cert))
        assert client.ping()
    after = _redis_certificate(mesh)
    assert after != before
    assert after == x509.load_pem_x509_certificate(renewed.cert.read_bytes()).public_bytes(Encoding.DER)


IDENTITY = (("x-meshserve-tenant", "acme"), ("x-meshserve-key-id", "key_x"))
# One RPC of each service: the service it goes to and how to make it on a channel.
CALLS: dict[str, tuple[str, Callable[[grpc.Channel], object]]] = {
    "check": (
        "auth",
        lambda c: external_auth_pb2_grpc.AuthorizationStub(c).Check(external_auth_pb2.CheckRequest(), timeout=5),
    ),
    "should_rate_limit": (
        "ratelimit",
        lambda c: rls_pb2_grpc.RateLimitServiceStub(c).ShouldRateLimit(
            rls_pb2.RateLimitRequest(domain="meshserve"), timeout=5
        ),
    ),
    "record_usage": (
        "billing",
        lambda c: billing_pb2_grpc.BillingServiceStub(c).RecordUsage(
            iter([billing_pb2.RecordUsageRequest()]), timeout=5
        ),
    ),
    "count_tokens": (
        "inference",
        lambda c: inference_pb2_grpc.InferenceServiceStub(c).CountTokens(inference_pb2.CountTokensRequest(), timeout=5),
    ),
    "list_models": (
        "router",
        lambda c: llm_pb2_grpc.LlmServiceStub(c).ListModels(llm_pb2.ListModelsRequest(), metadata=IDENTITY, timeout=5),
    ),
}


def test_each_rpc_takes_only_the_callers_of_the_matrix(mesh: LocalMesh) -> None:
    def code(rpc: str, caller: str) -> str:
        """The status name of one call of rpc as the mesh identity caller (OK when it succeeds)."""
        service, call = CALLS[rpc]
        with mesh.channel(service, caller) as channel:
            try:
                call(channel)
            except grpc.RpcError as exc:
                return str(exc.code().name)  # type: ignore[attr-defined]
        return "OK"

    # Refused by identity: a router cannot authorize requests or take request limits; the edge cannot
    # write usage or reach an engine; an engine cannot call the router.
    assert code("check", "router") == "PERMISSION_DENIED"
    assert code("should_rate_limit", "router") == "PERMISSION_DENIED"
    assert code("record_usage", "edge") == "PERMISSION_DENIED"
    assert code("count_tokens", "edge") == "PERMISSION_DENIED"
    assert code("list_models", "inference") == "PERMISSION_DENIED"
    # Taken from the callers the matrix names (the answer is the service's own, past the identity check).
    assert code("check", "edge") == "OK"
    assert code("should_rate_limit", "edge") in ("OK", "INVALID_ARGUMENT")
    assert code("record_usage", "router") == "OK"
    assert code("count_tokens", "router") == "OK"
    assert code("list_models", "edge") == "OK"


def _served_serial(mesh: LocalMesh, name: str) -> int:
    """The serial number of the certificate a new TLS connection to the service gets."""
    client = mesh.identity("admin")
    assert client is not None
    context = ssl.create_default_context(cafile=str(client.ca))
    context.load_cert_chain(client.cert, client.key)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", mesh.procs[name].grpc_port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=name) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def _edge_stats(mesh: LocalMesh) -> dict[str, int]:
    url = f"http://{mesh.admin.host}:{mesh.admin.port}/stats?format=json&filter=ssl_context_update_by_sds|key_rotation"
    with urllib.request.urlopen(url, timeout=5) as r:
        return {s["name"]: int(s.get("value", 0)) for s in json.loads(r.read())["stats"] if "name" in s}


def test_rotated_certificates_are_taken_without_a_dropped_request(mesh: LocalMesh) -> None:
    tls_dir = mesh.options.state_dir / "tls"
    before, stats = _served_serial(mesh, "router"), _edge_stats(mesh)
    updated = "cluster.router.client_ssl_socket_factory.ssl_context_update_by_sds"
    with Bystanders(mesh, 4) as bystanders:
        time.sleep(1)
        tls.issue(tls_dir, "router", renew=True)
        tls.issue(tls_dir, "edge", renew=True)
        time.sleep(2)
    assert bystanders.results and set(bystanders.results) == {"ok"}, bystanders.results[:3]
    assert _served_serial(mesh, "router") != before, "the router still serves the old certificate"
    deadline = time.monotonic() + 10
    while (now := _edge_stats(mesh))[updated] <= stats[updated]:
        assert time.monotonic() < deadline, "Envoy did not take the edge's new certificate"
        time.sleep(0.2)
    assert now["sds.mesh_client.key_rotation_failed"] == 0, "Envoy read a certificate and key that do not match"
    # The router's own clients (replicas, token budgets, billing) call with its new certificate too.
    log = mesh.procs["router"].log.read_text()
    assert "calling with the new ones" in log, "the router's clients kept the old certificate"
