"""Errors through the real edge and router, with a scripted inference replica behind them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from grpc import aio

from meshserve.inference.v1 import inference_pb2 as ipb
from meshserve.inference.v1 import inference_pb2_grpc
from services.mesh.local import LocalMesh, MeshOptions

MODEL = "smollm2-135m-instruct"


class ScriptedInference(inference_pb2_grpc.InferenceServiceServicer):
    """Streams two tokens, then fails if the prompt says so; refuses outright for 'down'."""

    async def Generate(self, request: ipb.GenerateRequest, context: Any) -> AsyncIterator[ipb.GenerateResponse]:
        prompt = request.input.conversation.turns[-1].content
        if prompt == "down":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "engine is restarting")
        for i, text in enumerate(["Hello", " there"], 1):
            yield ipb.GenerateResponse(text=text, token_ids=[i], prompt_tokens=3, completion_tokens=i)
            await asyncio.sleep(0.05)
        if prompt == "fail":
            await context.abort(grpc.StatusCode.INTERNAL, "engine crashed")
        yield ipb.GenerateResponse(prompt_tokens=3, completion_tokens=2, finish_reason=ipb.FINISH_REASON_STOP)


@pytest.fixture(scope="module")
def scripted_replica() -> Iterator[str]:
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def run() -> None:
        server = aio.server()
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(ScriptedInference(), server)
        holder["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        holder["server"] = server
        started.set()
        await server.wait_for_termination()

    thread = threading.Thread(target=lambda: loop.run_until_complete(run()), daemon=True)
    thread.start()
    assert started.wait(10)
    yield f"127.0.0.1:{holder['port']}"
    asyncio.run_coroutine_threadsafe(holder["server"].stop(0), loop).result(10)
    thread.join(10)


@pytest.fixture(scope="module")
def edge(scripted_replica: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    mesh = LocalMesh(MeshOptions(state_dir=tmp_path_factory.mktemp("edge"), model=MODEL, model_store=Path("unused")))
    try:
        mesh.wait_serving(mesh.start_router(replicas=[scripted_replica]), 60)
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
    router = mesh.start_router(replicas=["127.0.0.1:1"])
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
