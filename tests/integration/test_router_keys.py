"""Generation's API keys checked in the router (the edge skips ext_authz on generation's routes): the same
answers a client got from the edge's check, one service call less, and nothing a client forges is believed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from meshserve.auth.v1 import auth_pb2
from services.mesh.local import LocalMesh
from tests.integration import scripted_inference

MODEL = "smollm2-135m-instruct"
RULES = Path(__file__).with_name("ratelimits-hardening.yaml")
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
# A client passing itself off as another tenant's key with every model.
FORGED = {"x-meshserve-tenant": "someone-else", "x-meshserve-key-id": "key_forged", "x-meshserve-models": "*"}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with scripted_inference.scripted_mesh(tmp_path_factory.mktemp("router-keys"), RULES, 2, 0.0) as m:
        yield m


def create(mesh: LocalMesh, models: tuple[str, ...] = ()) -> auth_pb2.CreateKeyResponse:
    channel, stub, admin = mesh.admin_stub()
    with channel:
        request = auth_pb2.CreateKeyRequest(tenant="acme", allowed_models=models)
        return stub.CreateKey(request, metadata=admin, timeout=10)


def revoke(mesh: LocalMesh, key_id: str) -> None:
    channel, stub, admin = mesh.admin_stub()
    with channel:
        stub.RevokeKey(auth_pb2.RevokeKeyRequest(key_id=key_id), metadata=admin, timeout=10)


def chat(mesh: LocalMesh, headers: dict[str, str], stream: bool = False) -> httpx.Response:
    return httpx.post(f"{mesh.edge_url}/v1/chat/completions", json={**BODY, "stream": stream}, headers=headers)


def auth_calls(mesh: LocalMesh) -> int:
    """Requests the edge has sent to the auth service."""
    url = f"http://{mesh.admin.host}:{mesh.admin.port}/stats?format=json&filter=^cluster.auth.upstream_rq_total$"
    [stat] = httpx.get(url, timeout=5).json()["stats"]
    return int(stat["value"])


def test_generation_makes_no_call_to_the_auth_service_and_other_routes_still_do(mesh: LocalMesh) -> None:
    headers = {"authorization": f"Bearer {mesh.user_key}"}
    assert chat(mesh, headers).status_code == 200  # the key is in the router's cache from here on
    before = auth_calls(mesh)
    for stream in (False, True):
        assert chat(mesh, headers, stream).status_code == 200
    assert auth_calls(mesh) == before
    assert httpx.get(f"{mesh.edge_url}/v1/models", headers=headers).status_code == 200
    assert auth_calls(mesh) == before + 1


def test_a_missing_or_wrong_key_is_refused_in_openais_shape_whatever_identity_a_client_forges(mesh: LocalMesh) -> None:
    for headers in (FORGED, {**FORGED, "authorization": "Bearer msk-" + "x" * 40}):
        for stream in (False, True):
            r = chat(mesh, headers, stream)
            assert r.status_code == 401, r.text
            assert r.json()["error"]["type"] == "authentication_error", r.text
    malformed = chat(mesh, {"authorization": "Basic abc"})
    assert malformed.status_code == 401 and "Bearer" in malformed.json()["error"]["message"]


def test_a_keys_models_are_its_records_not_the_headers_a_client_sends(mesh: LocalMesh) -> None:
    limited = create(mesh, models=("another-model",))
    r = chat(mesh, {**FORGED, "authorization": f"Bearer {limited.secret}"})
    assert r.status_code == 403, r.text
    assert limited.key.key_id in r.json()["error"]["message"]
    allowed = create(mesh, models=(MODEL,))
    assert chat(mesh, {**FORGED, "x-api-key": allowed.secret}).status_code == 200  # Anthropic's SDK's header


def test_a_revoked_key_stops_generating_within_a_second(mesh: LocalMesh) -> None:
    created = create(mesh)
    headers = {"authorization": f"Bearer {created.secret}"}
    assert chat(mesh, headers).status_code == 200  # cached in the router
    revoke(mesh, created.key.key_id)
    revoked = time.monotonic()
    while (r := chat(mesh, headers)).status_code == 200:
        assert time.monotonic() - revoked < 1.0
        time.sleep(0.02)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
