"""The auth service with real Redis and Envoy: replicas share keys, backends see identity but never secrets."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from meshserve.auth.v1 import auth_pb2
from services.mesh.local import LocalMesh, MeshOptions

# Short, so the test sees the window run out.
OUTAGE_GRACE_SECONDS = 3


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    m = LocalMesh(MeshOptions(state_dir=tmp_path_factory.mktemp("auth"), model="m", model_store=Path("unused")))
    try:
        m.start_redis()
        grace = {"MESHSERVE_AUTH_OUTAGE_GRACE_SECONDS": str(OUTAGE_GRACE_SECONDS)}
        m.wait_serving(m.start_auth("auth", grace), 30)
        m.wait_serving(m.start_auth("auth-2", grace), 30)
        router = m.start_service("router", "tests.integration.recording_router", "MESHSERVE_", kind="router")
        m.wait_serving(router, 30)
        m.start_envoy()
        m.wait_edge(30)
        yield m
    finally:
        m.stop()


def check(mesh: LocalMesh, replica: str, secret: str) -> int:
    """The status code (google.rpc) replica's ext_authz Check gives a request with secret."""
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.path = "/v1/models"
    request.attributes.request.http.headers["authorization"] = f"Bearer {secret}"
    with mesh.channel(replica, "edge") as channel:
        return int(external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=5).status.code)


def create(mesh: LocalMesh, models: tuple[str, ...] = ()) -> auth_pb2.CreateKeyResponse:
    channel, stub, admin = mesh.admin_stub()
    with channel:
        request = auth_pb2.CreateKeyRequest(tenant="acme", allowed_models=models)
        return stub.CreateKey(request, metadata=admin, timeout=10)


def test_a_revocation_on_one_replica_reaches_the_other_within_a_second(mesh: LocalMesh) -> None:
    created = create(mesh)
    assert check(mesh, "auth-2", created.secret) == 0  # cached on the second replica now
    with mesh.channel("auth", "edge") as channel:
        from meshserve.auth.v1 import auth_pb2_grpc

        admin = (("authorization", f"Bearer {mesh.admin_key}"),)
        auth_pb2_grpc.AuthAdminServiceStub(channel).RevokeKey(
            auth_pb2.RevokeKeyRequest(key_id=created.key.key_id), metadata=admin, timeout=10
        )
    revoked = time.monotonic()
    while check(mesh, "auth-2", created.secret) == 0:
        assert time.monotonic() - revoked < 1.0
        time.sleep(0.01)
    assert check(mesh, "auth-2", created.secret) == 16  # UNAUTHENTICATED


def test_backends_get_the_identity_and_never_the_authorization_header(mesh: LocalMesh) -> None:
    created = create(mesh, models=("a", "b"))
    reply = httpx.get(
        f"{mesh.edge_url}/v1/models",
        headers={
            "authorization": f"Bearer {created.secret}",
            # A client trying to pass itself off as another tenant with every model.
            "x-meshserve-tenant": "someone-else",
            "x-meshserve-models": "*",
            "x-meshserve-key-id": "key_forged",
        },
    )
    assert reply.status_code == 200
    seen = dict(m["id"].split("=", 1) for m in reply.json()["data"])
    assert "authorization" not in seen
    assert seen["x-meshserve-tenant"] == "acme"
    assert seen["x-meshserve-key-id"] == created.key.key_id
    assert seen["x-meshserve-models"] == "a,b"
    assert created.secret not in reply.text


def test_anthropics_x_api_key_header_authenticates_and_never_reaches_a_backend(mesh: LocalMesh) -> None:
    created = create(mesh)
    reply = httpx.get(f"{mesh.edge_url}/v1/models", headers={"x-api-key": created.secret})
    assert reply.status_code == 200, reply.text
    seen = dict(m["id"].split("=", 1) for m in reply.json()["data"])
    assert "x-api-key" not in seen and seen["x-meshserve-key-id"] == created.key.key_id
    assert created.secret not in reply.text
    wrong = httpx.get(f"{mesh.edge_url}/v1/models", headers={"x-api-key": "msk-" + "x" * 40})
    assert wrong.status_code == 401


def test_the_bootstrap_admin_key_file_is_private(mesh: LocalMesh) -> None:
    assert mesh.admin_key_file.stat().st_mode & 0o077 == 0
    assert mesh.admin_key.startswith("msk-")


def test_an_operator_secret_becomes_the_admin_key_once(mesh: LocalMesh) -> None:
    from meshserve.auth.v1 import auth_pb2_grpc
    from services.auth.keys import new_secret

    secret = new_secret()
    env = {"MESHSERVE_AUTH_REDIS_URL": mesh.redis_url, "MESHSERVE_AUTH_BOOTSTRAP_ADMIN_SECRET": secret}
    for attempt in range(2):  # a restart must not create a second key
        replica = mesh.start_service(f"auth-operator-{attempt}", "services.auth", "MESHSERVE_AUTH_", env)
        mesh.wait_serving(replica, 30)
        with mesh.channel(replica, "edge") as channel:
            keys = auth_pb2_grpc.AuthAdminServiceStub(channel).ListKeys(
                auth_pb2.ListKeysRequest(tenant="admin"), metadata=(("authorization", f"Bearer {secret}"),), timeout=10
            )
        mesh.stop_proc(replica)
        assert [k.label for k in keys.keys].count("operator admin") == 1


def test_redis_down_keys_checked_before_pass_for_the_grace_window_then_auth_recovers(mesh: LocalMesh) -> None:
    created, unseen = create(mesh), create(mesh)
    headers = {"authorization": f"Bearer {created.secret}"}
    for _ in range(4):  # through both auth replicas (Envoy spreads checks over them)
        assert httpx.get(f"{mesh.edge_url}/v1/models", headers=headers).status_code == 200
    port = mesh.procs["redis"].grpc_port
    mesh.stop_proc(mesh.procs["redis"])
    stopped = time.monotonic()
    # A key checked before the outage still passes, from the cache; a key never seen cannot be checked.
    cached = [httpx.get(f"{mesh.edge_url}/v1/models", headers=headers).status_code for _ in range(4)]
    never = httpx.get(f"{mesh.edge_url}/v1/models", headers={"authorization": f"Bearer {unseen.secret}"})
    assert time.monotonic() - stopped < OUTAGE_GRACE_SECONDS
    assert cached == [200] * 4
    assert never.status_code == 503 and never.json()["error"]["type"] == "server_error"
    assert unseen.secret not in never.text
    # Past the window nothing is trusted from the cache: refuse, never let through.
    deadline = time.monotonic() + 10
    while (down := httpx.get(f"{mesh.edge_url}/v1/models", headers=headers)).status_code == 200:
        assert time.monotonic() < deadline, "requests were still let through after the grace window"
        time.sleep(0.1)
    assert time.monotonic() - stopped > OUTAGE_GRACE_SECONDS
    assert down.status_code == 503
    assert created.secret not in down.text
    mesh.start_redis(port=port)
    deadline = time.monotonic() + 15
    while httpx.get(f"{mesh.edge_url}/v1/models", headers=headers).status_code != 200:
        assert time.monotonic() < deadline, "auth did not recover after Redis returned"
        time.sleep(0.2)
