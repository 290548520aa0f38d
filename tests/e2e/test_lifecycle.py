"""Cancellation frees the engine; SIGTERM lets in-flight streams finish."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from meshserve.llm.v1 import llm_pb2, llm_pb2_grpc
from services.mesh.local import LocalMesh
from tests.e2e.helpers import MODEL, engine_load, openai_client

pytestmark = pytest.mark.mesh

LONG = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]


def wait_for(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_cancelling_a_stream_aborts_the_request_in_the_engine(mesh: LocalMesh) -> None:
    assert wait_for(lambda: engine_load(mesh).running == 0, 10)
    stream = openai_client(mesh).chat.completions.create(
        model=MODEL, messages=LONG, max_tokens=1500, temperature=0, stream=True
    )
    request_id = ""
    for i, chunk in enumerate(stream):
        request_id = chunk.id
        if i == 3:
            break
    assert engine_load(mesh).running == 1
    stream.close()
    # Without the abort the engine would keep generating for about a minute.
    assert wait_for(lambda: (load := engine_load(mesh)).running == 0 and load.in_flight == 0, 5)
    log = mesh.procs["inference"].log.read_text(errors="replace")
    assert re.search(rf'"msg": "aborted".*"request_id": "{request_id}"', log)


def test_sigterm_lets_a_running_stream_finish(mesh: LocalMesh) -> None:
    mesh.options.env["MESHSERVE_ROUTER_DRAIN_SECONDS"] = "1"
    router = mesh.start_router(name="router-sigterm")
    try:
        mesh.wait_serving(router, 60)
        with mesh.channel(router, "edge") as channel:
            stub = llm_pb2_grpc.LlmServiceStub(channel)
            params = llm_pb2.ChatCompletionParams(
                model=MODEL,
                messages=[llm_pb2.ChatMessage(role="user", content=LONG[0]["content"])],
                max_tokens=48,
                temperature=0,
                stream=True,
                stream_options=llm_pb2.StreamOptions(include_usage=True),
            )
            # Straight to the router, with a key (the router checks generation's keys itself).
            identity = (("authorization", f"Bearer {mesh.user_key}"),)
            chunks = stub.StreamChatCompletion(
                llm_pb2.StreamChatCompletionRequest(params=params), timeout=120, metadata=identity
            )
            received = [next(chunks)]
            router.popen.send_signal(signal.SIGTERM)
            received.extend(chunks)
        finishes = [c.choices[0].finish_reason for c in received if c.choices and c.choices[0].finish_reason]
        assert finishes == ["length"]
        assert received[-1].usage.completion_tokens == 48
        assert not any(c.HasField("error") for c in received)
        assert router.popen.wait(30) == 0
    finally:
        mesh.options.env.pop("MESHSERVE_ROUTER_DRAIN_SECONDS")
        mesh.stop_proc(router)


def test_the_token_relays_yield_the_cpu_to_the_engine(mesh: LocalMesh) -> None:
    def nice(name: str) -> int:
        stat = Path(f"/proc/{mesh.procs[name].popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(stat[16])

    assert nice("router") == nice("envoy") == mesh.options.support_nice > 0
    assert nice("inference") == 0 and nice("auth") == 0


def test_the_engine_load_is_exported_for_the_autoscaler(mesh: LocalMesh) -> None:
    import urllib.request

    from services.inference.metrics import QUEUE_DEPTH

    port = mesh.procs["inference"].metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        body = r.read().decode()
    assert f'{QUEUE_DEPTH}{{model="{MODEL}"}} 0.0' in body
    assert "meshserve_inference_running_requests" in body
    assert 'meshserve_rpc_requests_total{code="OK",method="Serve",service="inference"}' in body
