"""The real router over several scripted inference replicas: load, affinity, failover, ejection, backpressure."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from meshserve.llm.v1 import llm_pb2, llm_pb2_grpc
from services.mesh.local import LocalMesh, MeshOptions, Proc
from tests.integration import scripted_inference

MODEL = "smollm2-135m-instruct"
SYSTEM = "You are the support assistant of a large shop. " * 14  # over the 512-character affinity prefix


class Fleet:
    """Scripted replicas named a, b, c behind one router, plus the mesh to start more."""

    def __init__(self, mesh: LocalMesh, tmp: Path) -> None:
        self.mesh = mesh
        self.tmp = tmp
        self.replicas = {name: self.replica(name) for name in "abc"}
        for proc in self.replicas.values():
            mesh.wait_serving(proc, 30)
        self.router = self.start_router("router", list(self.replicas.values()))

    def replica(self, name: str, **env: str) -> Proc:
        return scripted_inference.start(
            self.mesh, name, 8, 0.05, **{"SCRIPTED_EVENTS": str(self.tmp / f"{name}.events"), **env}
        )

    def start_router(self, name: str, replicas: list[Proc], **env: str) -> Proc:
        router = self.mesh.start_router(
            name, replicas=[self.address(p) for p in replicas], require_caller=False, env=env
        )
        self.mesh.wait_serving(router, 60)
        self.mesh.wait_routable(router, replicas, 30)
        return router

    def address(self, proc: Proc) -> str:
        return f"127.0.0.1:{proc.grpc_port}"

    def events(self, name: str) -> list[str]:
        path = self.tmp / f"{name}.events"
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("replicas")
    mesh = LocalMesh(MeshOptions(state_dir=tmp, model=MODEL, model_store=Path("unused")))
    try:
        yield Fleet(mesh, tmp)
    finally:
        mesh.stop()


def stub(mesh: LocalMesh, router: Proc) -> tuple[grpc.Channel, llm_pb2_grpc.LlmServiceStub]:
    channel = mesh.channel(router, "edge")
    return channel, llm_pb2_grpc.LlmServiceStub(channel)


def params(user: str = "hi", system: str | None = None, max_tokens: int = 16) -> llm_pb2.ChatCompletionParams:
    messages = [llm_pb2.ChatMessage(role="system", content=system)] if system else []
    messages.append(llm_pb2.ChatMessage(role="user", content=user))
    return llm_pb2.ChatCompletionParams(model=MODEL, messages=messages, max_tokens=max_tokens)


def served_by(
    mesh: LocalMesh, router: Proc, p: llm_pb2.ChatCompletionParams, metadata: tuple[tuple[str, str], ...] = ()
) -> str:
    """The replica that answered (scripted replicas start their reply with their name)."""
    channel, llm = stub(mesh, router)
    with channel:
        reply = llm.CreateChatCompletion(llm_pb2.CreateChatCompletionRequest(params=p), timeout=30, metadata=metadata)
    return reply.choices[0].message.content.split(" ")[0]


def metric(router: Proc, line_start: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{router.metrics_port}/metrics", timeout=5) as r:
        body = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(line_start))


def test_concurrent_requests_spread_by_load(fleet: Fleet) -> None:
    with ThreadPoolExecutor(6) as pool:
        homes = Counter(pool.map(lambda i: served_by(fleet.mesh, fleet.router, params(f"question {i}")), range(6)))
    assert set(homes) == {"a", "b", "c"}, homes
    assert max(homes.values()) <= 3, homes


def test_a_shared_prefix_lands_on_one_replica_and_different_prefixes_spread(fleet: Fleet) -> None:
    homes = {served_by(fleet.mesh, fleet.router, params(f"question {i}", system=SYSTEM)) for i in range(9)}
    assert len(homes) == 1
    spread = {served_by(fleet.mesh, fleet.router, params("question", system=f"{i} {SYSTEM}")) for i in range(12)}
    assert len(spread) >= 2


def test_a_session_header_keeps_a_short_conversation_on_one_replica(fleet: Fleet) -> None:
    session = (("x-meshserve-session", "chat-7"),)
    assert len({served_by(fleet.mesh, fleet.router, params(f"turn {i}"), session) for i in range(6)}) == 1


def test_a_client_that_goes_away_aborts_the_generation_on_the_replica(fleet: Fleet) -> None:
    channel, llm = stub(fleet.mesh, fleet.router)
    with channel:
        stream = llm.StreamChatCompletion(
            llm_pb2.StreamChatCompletionRequest(params=params("long one", max_tokens=64)), timeout=30
        )
        first = next(stream)
        stream.cancel()
    request_id = first.id
    deadline = time.monotonic() + 5
    while not any(f"abort {request_id}" in fleet.events(n) for n in "abc"):
        assert time.monotonic() < deadline, "no replica saw the abort"
        time.sleep(0.05)


def test_a_replica_whose_engine_fails_is_ejected_and_requests_go_elsewhere(fleet: Fleet) -> None:
    broken = fleet.replica("broken", SCRIPTED_BROKEN="1")
    fleet.mesh.wait_serving(broken, 30)
    router = fleet.start_router("router-broken", [broken, fleet.replicas["a"]], MESHSERVE_ROUTER_BALANCE="round_robin")
    assert [served_by(fleet.mesh, router, params(f"q{i}")) for i in range(6)] == ["a"] * 6
    assert metric(router, f'meshserve_router_ejections_total{{replica="{fleet.address(broken)}"}}') >= 1
    assert metric(router, "meshserve_router_failovers_total") >= 1
    assert fleet.events("broken") == []


def test_saturation_is_refused_fast_with_retry_after(fleet: Fleet) -> None:
    slow = fleet.replica("slow", SCRIPTED_CAPACITY="2", SCRIPTED_TOKENS="30")
    fleet.mesh.wait_serving(slow, 30)
    router = fleet.start_router("router-small", [slow], MESHSERVE_ROUTER_QUEUE_SIZE="2")

    def call(i: int) -> tuple[grpc.StatusCode, float, str]:
        channel, llm = stub(fleet.mesh, router)
        started = time.monotonic()
        with channel:
            try:
                llm.CreateChatCompletion(llm_pb2.CreateChatCompletionRequest(params=params(f"q{i}")), timeout=30)
                return grpc.StatusCode.OK, time.monotonic() - started, ""
            except grpc.RpcError as exc:
                retry = dict(exc.trailing_metadata() or ()).get("retry-after", "")  # type: ignore[attr-defined]
                return exc.code(), time.monotonic() - started, str(retry)  # type: ignore[attr-defined]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))
    codes = Counter(code for code, _, _ in results)
    assert codes == {grpc.StatusCode.OK: 4, grpc.StatusCode.RESOURCE_EXHAUSTED: 4}, results
    refused = [(elapsed, retry) for code, elapsed, retry in results if code != grpc.StatusCode.OK]
    assert all(elapsed < 1.0 and int(retry) >= 1 for elapsed, retry in refused), refused
    assert metric(router, "meshserve_router_queue_depth") == 0


def test_kill_9_mid_load_errors_only_the_started_streams_then_the_replica_comes_back(fleet: Fleet) -> None:
    victim = fleet.replica("victim", SCRIPTED_TOKENS="60")
    survivor = fleet.replica("survivor", SCRIPTED_TOKENS="60")
    for proc in (victim, survivor):
        fleet.mesh.wait_serving(proc, 30)
    router = fleet.start_router("router-kill", [victim, survivor])
    channel, llm = stub(fleet.mesh, router)
    with channel:
        streams = [
            llm.StreamChatCompletion(
                llm_pb2.StreamChatCompletionRequest(params=params(f"story {i}", max_tokens=64)), timeout=60
            )
            for i in range(4)
        ]
        firsts = [next(s) for s in streams]
        homes = [f.choices[0].delta.content for f in firsts]
        assert sorted(homes) == ["survivor", "survivor", "victim", "victim"]
        os.killpg(victim.popen.pid, signal.SIGKILL)
        victim.popen.wait()
        # Requests that had not started: all served, by the survivor, without a client error.
        after = [served_by(fleet.mesh, router, params(f"after {i}")) for i in range(6)]
        assert after == ["survivor"] * 6
        # Streams that had started: in-band errors on the victim's, clean finishes on the survivor's.
        for home, stream in zip(homes, streams, strict=True):
            rest = list(stream)
            if home == "victim":
                assert rest[-1].error.code == "service_unavailable", rest[-1]
            else:
                assert rest[-1].choices[0].finish_reason == "stop"
    assert metric(router, f'meshserve_router_replica_available{{replica="{fleet.address(victim)}"}}') == 0
    restarted = fleet.mesh.restart("victim")
    fleet.mesh.wait_routable(router, [restarted], 30)
    with ThreadPoolExecutor(4) as pool:
        homes_now = set(pool.map(lambda i: served_by(fleet.mesh, router, params(f"back {i}")), range(4)))
    assert homes_now == {"victim", "survivor"}
