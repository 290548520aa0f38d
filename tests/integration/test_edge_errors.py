"""Errors through the real edge and router, with a scripted inference replica behind them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from services.mesh.local import LocalMesh, MeshOptions

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    mesh = LocalMesh(MeshOptions(state_dir=tmp_path_factory.mktemp("edge"), model=MODEL, model_store=Path("unused")))
    try:
        replica = mesh.start_service("scripted", "tests.integration.scripted_inference", "MESHSERVE_", kind="inference")
        mesh.wait_serving(replica, 30)
        mesh.wait_serving(mesh.start_router(replicas=[f"127.0.0.1:{replica.grpc_port}"], require_caller=False), 60)
        mesh.start_envoy()
        mesh.wait_edge(30)
        yield mesh
    finally:
        mesh.stop()


def client(mesh: LocalMesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.edge_url}/v1", api_key="unused", max_retries=0)


def test_an_error_after_streaming_began_reaches_the_sdk_in_band(edge: LocalMesh) -> None:
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client(edge).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "fail"}], stream=True
        ):
            if chunk.choices:
                received.append(chunk.choices[0].delta.content)
    assert received == ["Hello", " there"]
    assert "engine crashed" in info.value.message


def test_a_clean_stream_through_the_scripted_replica(edge: LocalMesh) -> None:
    chunks = list(
        client(edge).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ok"}], stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_an_engine_down_before_the_first_token_is_a_503_in_openai_shape(edge: LocalMesh) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client(edge).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "down"}], stream=True)
    assert info.value.status_code == 503
    assert "engine is restarting" in info.value.message
    raw = httpx.post(
        f"{edge.edge_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "down"}]},
    )
    assert raw.status_code == 503
    assert raw.json()["error"]["type"] == "server_error"


def test_a_router_that_is_gone_is_an_openai_shaped_503(edge: LocalMesh, tmp_path: Path) -> None:
    mesh = LocalMesh(MeshOptions(state_dir=tmp_path, model=MODEL, model_store=Path("unused")))
    router = mesh.start_router(replicas=["127.0.0.1:1"], require_caller=False, required_for_ready=False)
    try:
        mesh.wait_serving(router, 60)
        mesh.start_envoy()
        mesh.wait_edge(30)
        mesh.stop_proc(router)
        raw = httpx.get(f"{mesh.edge_url}/v1/models")
        assert raw.status_code == 503
        assert raw.json()["error"]["type"] == "server_error"
    finally:
        mesh.stop()
