"""What the edge answers itself: a public health endpoint, CORS for browsers, and a request id on every reply."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.mesh.local import LocalMesh
from tests.integration import scripted_inference

MODEL = "smollm2-135m-instruct"
RULES = Path(__file__).with_name("ratelimits-hardening.yaml")
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with scripted_inference.scripted_mesh(tmp_path_factory.mktemp("surface"), RULES, 2, 0.01) as m:
        yield m


def health(mesh: LocalMesh, want: int, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while (code := httpx.get(f"{mesh.edge_url}/health", timeout=5).status_code) != want:
        assert time.monotonic() < deadline, f"/health stayed {code}, wanted {want}"
        time.sleep(0.2)


def test_health_needs_no_key_and_says_whether_a_router_serves(mesh: LocalMesh) -> None:
    health(mesh, 200)
    router = mesh.procs["router"]
    mesh.stop_proc(router)
    health(mesh, 503)
    mesh.restart("router")
    health(mesh, 200)


def test_a_preflight_needs_no_key_and_allows_any_origin_without_credentials(mesh: LocalMesh) -> None:
    r = httpx.options(
        f"{mesh.edge_url}/v1/chat/completions",
        headers={
            "origin": "https://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] in ("*", "https://app.example")
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in r.headers
    answer = httpx.post(
        f"{mesh.edge_url}/v1/chat/completions",
        json=BODY,
        headers={"origin": "https://app.example", "authorization": f"Bearer {mesh.user_key}"},
    )
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] in ("*", "https://app.example")
    assert "x-request-id" in answer.headers["access-control-expose-headers"]


def test_every_reply_carries_a_request_id_and_keeps_the_clients_own(mesh: LocalMesh) -> None:
    headers = {"authorization": f"Bearer {mesh.user_key}"}
    mine = httpx.post(f"{mesh.edge_url}/v1/chat/completions", json=BODY, headers={**headers, "x-request-id": "req-42"})
    assert mine.headers["x-request-id"] == "req-42"
    assigned = httpx.post(f"{mesh.edge_url}/v1/chat/completions", json=BODY, headers=headers)
    refused = httpx.get(f"{mesh.edge_url}/v1/models")  # no key: an error reply has one too
    assert assigned.headers["x-request-id"] and refused.headers["x-request-id"]
    assert assigned.headers["x-request-id"] != refused.headers["x-request-id"]


def test_the_sdk_retrieves_a_model_the_key_may_use_and_no_other(mesh: LocalMesh) -> None:
    import openai

    from meshserve.auth.v1 import auth_pb2

    client = openai.OpenAI(base_url=f"{mesh.edge_url}/v1", api_key=mesh.user_key, max_retries=0)
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "meshserve")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    channel, stub, admin = mesh.admin_stub()
    with channel:
        limited = stub.CreateKey(
            auth_pb2.CreateKeyRequest(tenant="limited", allowed_models=["another-model"]), metadata=admin, timeout=10
        )
    other = openai.OpenAI(base_url=f"{mesh.edge_url}/v1", api_key=limited.secret, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        other.models.retrieve(MODEL)
