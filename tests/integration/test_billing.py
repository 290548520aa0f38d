"""Billing on real Redis and SQLite: once per request id, exact ledger flushes, and the router's spool."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
import redis.asyncio as redis

from meshserve.billing.v1 import billing_pb2, billing_pb2_grpc
from meshserve.llm.v1 import llm_pb2, llm_pb2_grpc
from services.billing.flush import flush_once
from services.billing.ledger import SqliteLedger
from services.billing.meter import Meter, Usage
from services.billing.prices import Prices
from services.mesh.local import LocalMesh, MeshOptions
from services.runtime.errors import InvalidArgument
from services.runtime.identity import KEY_ID_HEADER, TENANT_HEADER

MODEL = "smollm2-135m-instruct"
PRICES = Prices.model_validate(
    {"models": {MODEL: {"prompt_per_1k": Decimal("0.0002"), "completion_per_1k": Decimal("0.0006")}}}
)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    m = LocalMesh(MeshOptions(state_dir=tmp_path_factory.mktemp("billing"), model=MODEL, model_store=Path("unused")))
    try:
        m.start_redis()
        yield m
    finally:
        m.stop()


@pytest.fixture
async def client(mesh: LocalMesh) -> AsyncIterator[redis.Redis]:
    c = redis.Redis.from_url(mesh.redis_url)
    await c.flushdb()
    yield c
    await c.aclose()


def usage(request_id: str, prompt: int = 10, completion: int = 5, key: str = "key_1", **kw: object) -> Usage:
    fields: dict[str, object] = {
        "tenant": "acme",
        "key_id": key,
        "model": MODEL,
        "version": "v1",
        "outcome": "completed",
        "finished_at": time.time(),
        **kw,
    }
    return Usage(request_id, prompt_tokens=prompt, completion_tokens=completion, **fields)  # type: ignore[arg-type]


async def test_the_same_record_counts_once_and_the_ledger_gets_exact_totals(
    client: redis.Redis, tmp_path: Path
) -> None:
    meter, ledger = Meter(client), SqliteLedger(tmp_path / "ledger.sqlite")
    assert await meter.record([usage("r1"), usage("r2", 20, 7), usage("r1")]) == (2, 1)
    assert await meter.record([usage("r2", 20, 7)]) == (0, 1)
    assert await flush_once(meter, ledger, PRICES) == 1
    [line] = ledger.usage(0, int(time.time()) + 3600)
    assert (line.requests, line.prompt_tokens, line.completion_tokens) == (2, 30, 12)
    assert line.cost == Decimal("0.000013")  # 30 x 0.0002/1000 + 12 x 0.0006/1000, exactly
    assert await meter.dirty() == []


async def test_a_flush_that_crashed_before_marking_writes_the_same_totals_again(
    client: redis.Redis, tmp_path: Path
) -> None:
    meter, ledger = Meter(client), SqliteLedger(tmp_path / "ledger.sqlite")
    await meter.record([usage(f"r{i}") for i in range(5)])
    # A flusher that wrote the ledger and died before marking the bucket clean...
    [key] = await meter.dirty()
    bucket = await meter.read(key)
    assert bucket is not None
    ledger.write([bucket], PRICES)
    # ...and a record that arrived meanwhile.
    await meter.record([usage("late")])
    assert not await meter.caught_up(bucket)
    await flush_once(meter, ledger, PRICES)
    await flush_once(meter, ledger, PRICES)
    [line] = ledger.usage(0, int(time.time()) + 3600)
    assert (line.requests, line.prompt_tokens, line.completion_tokens) == (6, 60, 30)


async def test_records_are_bucketed_per_key_and_hour_and_queries_filter(client: redis.Redis, tmp_path: Path) -> None:
    meter, ledger = Meter(client), SqliteLedger(tmp_path / "ledger.sqlite")
    now = time.time()
    await meter.record(
        [usage("a", key="key_a"), usage("b", key="key_b"), usage("old", key="key_a", finished_at=now - 7200)]
    )
    await flush_once(meter, ledger, PRICES)
    lines = {line.key_id: line for line in ledger.usage(0, int(now) + 3600)}
    assert lines["key_a"].requests == 2 and lines["key_b"].requests == 1
    recent = ledger.usage(int(now) // 3600 * 3600, int(now) + 3600, key_id="key_a")
    assert [line.requests for line in recent] == [1]


async def test_bad_records_are_refused_whole(client: redis.Redis) -> None:
    meter = Meter(client)
    with pytest.raises(InvalidArgument, match="outcome"):
        await meter.record([usage("ok"), usage("bad", outcome="exploded")])
    with pytest.raises(InvalidArgument, match="within the last 7 days"):
        await meter.record([usage("ancient", finished_at=time.time() - 8 * 86400)])
    assert await meter.dirty() == []


# The service, and the router's side of it, as processes.


class Metered:
    """A billing service, a scripted replica and a router that records usage to billing."""

    def __init__(self, mesh: LocalMesh) -> None:
        self.mesh = mesh
        self.billing = mesh.start_billing()
        mesh.wait_serving(self.billing, 30)
        replica = mesh.start_service(
            "scripted",
            "tests.integration.scripted_inference",
            "MESHSERVE_",
            {"SCRIPTED_NAME": "tok", "SCRIPTED_TOKENS": "6", "SCRIPTED_TOKEN_SECONDS": "0.02"},
        )
        mesh.wait_serving(replica, 30)
        self.router = mesh.start_router(
            replicas=[f"127.0.0.1:{replica.grpc_port}"],
            require_caller=False,
            env={"MESHSERVE_ROUTER_USAGE_REPLAY_SECONDS": "0.5"},
        )
        mesh.wait_serving(self.router, 60)
        mesh.wait_routable(self.router, [replica], 30)

    def chat(self, key: str, stream: bool = False) -> int:
        """One request as tenant acme with key; the completion tokens the client was told."""
        identity = ((TENANT_HEADER, "acme"), (KEY_ID_HEADER, key))
        params = llm_pb2.ChatCompletionParams(
            model=MODEL,
            messages=[llm_pb2.ChatMessage(role="user", content="count")],
        )
        if stream:
            params.stream = True
            params.stream_options.include_usage = True
        with grpc.insecure_channel(f"127.0.0.1:{self.router.grpc_port}") as channel:
            llm = llm_pb2_grpc.LlmServiceStub(channel)
            if not stream:
                reply = llm.CreateChatCompletion(
                    llm_pb2.CreateChatCompletionRequest(params=params), timeout=30, metadata=identity
                )
                return int(reply.usage.completion_tokens)
            chunks = list(
                llm.StreamChatCompletion(
                    llm_pb2.StreamChatCompletionRequest(params=params), timeout=30, metadata=identity
                )
            )
            return int(chunks[-1].usage.completion_tokens)

    def ledger(self, key: str, want_requests: int, timeout: float = 20) -> billing_pb2.UsageLine:
        """The key's ledger line once it holds want_requests requests (flushes are asynchronous)."""
        deadline = time.monotonic() + timeout
        line = billing_pb2.UsageLine()
        while time.monotonic() < deadline:
            with grpc.insecure_channel(f"127.0.0.1:{self.billing.grpc_port}") as channel:
                reply = billing_pb2_grpc.BillingServiceStub(channel).GetUsage(
                    billing_pb2.GetUsageRequest(key_id=key), timeout=10
                )
            if reply.lines:
                line = reply.lines[0]
                if line.requests >= want_requests:
                    return line
            time.sleep(0.2)
        return line


@pytest.fixture(scope="module")
def metered(mesh: LocalMesh) -> Metered:
    return Metered(mesh)


def test_the_ledger_holds_what_the_clients_were_told(metered: Metered) -> None:
    told = [metered.chat("key_told", stream=i % 2 == 0) for i in range(10)]
    line = metered.ledger("key_told", 10)
    assert (line.requests, line.completion_tokens) == (10, sum(told))
    assert Decimal(line.cost) == PRICES.cost(MODEL, line.prompt_tokens, line.completion_tokens)
    time.sleep(1.5)
    assert metered.ledger("key_told", 10).requests == 10  # and nothing more arrives later


def test_while_billing_is_down_usage_is_spooled_and_arrives_once_afterwards(metered: Metered) -> None:
    metered.mesh.stop_proc(metered.billing)
    told = [metered.chat("key_spooled") for _ in range(5)]
    spool = metered.mesh.options.state_dir / "spool" / "router"
    assert list(spool.glob("*.batch"))
    metered.billing = metered.mesh.restart("billing")
    line = metered.ledger("key_spooled", 5)
    assert (line.requests, line.completion_tokens) == (5, sum(told))
    deadline = time.monotonic() + 10
    while list(spool.glob("*.batch")):
        assert time.monotonic() < deadline, "the spool was not emptied"
        time.sleep(0.1)


def test_kill_9_of_billing_during_load_loses_and_doubles_nothing(metered: Metered) -> None:
    def load(i: int) -> int:
        if i == 12:
            os.killpg(metered.billing.popen.pid, signal.SIGKILL)
        return metered.chat("key_killed")

    with ThreadPoolExecutor(4) as pool:
        told = list(pool.map(load, range(30)))
    metered.billing.popen.wait()
    metered.billing = metered.mesh.restart("billing")
    line = metered.ledger("key_killed", 30)
    assert (line.requests, line.completion_tokens) == (30, sum(told))
    time.sleep(1.5)
    assert metered.ledger("key_killed", 30).requests == 30


def test_the_same_batch_sent_twice_counts_once_through_the_service(metered: Metered) -> None:
    record = billing_pb2.UsageRecord(
        request_id="twice-1",
        tenant="acme",
        key_id="key_twice",
        model=MODEL,
        version="v1",
        prompt_tokens=3,
        completion_tokens=4,
        outcome=billing_pb2.OUTCOME_COMPLETED,
    )
    record.finished_at.GetCurrentTime()
    batch = billing_pb2.RecordUsageRequest(records=[record])
    with grpc.insecure_channel(f"127.0.0.1:{metered.billing.grpc_port}") as channel:
        stub = billing_pb2_grpc.BillingServiceStub(channel)
        first = stub.RecordUsage(iter([batch, batch]), timeout=10)
        again = stub.RecordUsage(iter([batch]), timeout=10)
    assert (first.accepted, first.duplicates, again.accepted, again.duplicates) == (1, 1, 0, 1)
    assert metered.ledger("key_twice", 1).requests == 1


def test_an_unknown_outcome_is_invalid_argument(metered: Metered) -> None:
    bad = billing_pb2.RecordUsageRequest(records=[billing_pb2.UsageRecord(request_id="x", model=MODEL)])
    with grpc.insecure_channel(f"127.0.0.1:{metered.billing.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            billing_pb2_grpc.BillingServiceStub(channel).RecordUsage(iter([bad]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


async def test_a_bucket_redis_lost_and_recreated_adds_to_the_ledger_instead_of_overwriting(
    client: redis.Redis, tmp_path: Path
) -> None:
    meter, ledger = Meter(client), SqliteLedger(tmp_path / "ledger.sqlite")
    await meter.record([usage(f"before-{i}") for i in range(3)])
    await flush_once(meter, ledger, PRICES)
    await client.flushdb()  # Redis lost everything
    meter = Meter(client)
    await meter.record([usage("after-1")])
    await flush_once(meter, ledger, PRICES)
    [line] = ledger.usage(0, int(time.time()) + 3600)
    assert (line.requests, line.prompt_tokens) == (4, 40)
