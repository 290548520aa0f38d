"""Billing as a service, with a router recording usage to it: the ledger holds what clients were told,
through a billing outage, a kill -9 and a webhook that fails its first posts."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import grpc
import pytest
from redis import Redis as SyncRedis

from meshserve.billing.v1 import billing_pb2, billing_pb2_grpc
from meshserve.llm.v1 import llm_pb2, llm_pb2_grpc
from services.mesh.local import LocalMesh
from services.runtime.identity import KEY_ID_HEADER, TENANT_HEADER
from tests.integration import scripted_inference
from tests.integration.test_billing import PRICES
from tests.postgres import fresh_database
from tests.webhook_receiver import Receiver

MODEL = "smollm2-135m-instruct"


# The service, and the router's side of it, as processes.


class Metered:
    """A billing service, a scripted replica and a router that records usage to billing."""

    def __init__(self, mesh: LocalMesh, billing_env: dict[str, str], receiver: Receiver) -> None:
        self.mesh = mesh
        self.receiver = receiver
        self.billing = mesh.start_billing(env=billing_env)
        mesh.wait_serving(self.billing, 30)
        replica = scripted_inference.start(mesh, "tok", 6, 0.02)
        mesh.wait_serving(replica, 30)
        self.replica = replica
        self.router = mesh.start_router(
            replicas=[f"127.0.0.1:{replica.grpc_port}"],
            require_caller=False,
            env={"MESHSERVE_ROUTER_USAGE_REPLAY_SECONDS": "0.5"},
        )
        mesh.wait_serving(self.router, 60)
        mesh.wait_routable(self.router, [replica], 30)

    def chat(self, key: str, stream: bool = False, content: str = "count") -> int:
        """One request as tenant acme with key; the completion tokens the client was told."""
        identity = ((TENANT_HEADER, "acme"), (KEY_ID_HEADER, key))
        params = llm_pb2.ChatCompletionParams(
            model=MODEL,
            messages=[llm_pb2.ChatMessage(role="user", content=content)],
        )
        if stream:
            params.stream = True
            params.stream_options.include_usage = True
        with self.mesh.channel(self.router, "edge") as channel:
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
            with self.mesh.channel(self.billing, "admin") as channel:
                reply = billing_pb2_grpc.BillingServiceStub(channel).GetUsage(
                    billing_pb2.GetUsageRequest(key_id=key), timeout=10
                )
            if reply.lines:
                line = reply.lines[0]
                if line.requests >= want_requests:
                    return line
            time.sleep(0.2)
        return line

    def lines(self) -> list[billing_pb2.UsageLine]:
        with self.mesh.channel(self.billing, "admin") as channel:
            return list(
                billing_pb2_grpc.BillingServiceStub(channel).GetUsage(billing_pb2.GetUsageRequest(), timeout=10).lines
            )

    def stop(self) -> None:
        for proc in (self.router, self.billing, self.replica):
            self.mesh.stop_proc(proc)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def metered(redis_mesh: LocalMesh, request: pytest.FixtureRequest) -> Iterator[Metered]:
    mesh = redis_mesh
    """The service tests run once over each ledger, with a webhook that fails its first posts."""
    # The other ledger's run counted into the same Redis.
    SyncRedis.from_url(mesh.redis_url, **mesh.redis_options()).flushall()
    receiver = Receiver(secret="whsec_test", fail_first=3)
    env = {
        "MESHSERVE_BILLING_WEBHOOK_URL": receiver.url,
        "MESHSERVE_BILLING_WEBHOOK_SECRET": "whsec_test",
        "MESHSERVE_BILLING_WEBHOOK_POLL_SECONDS": "0.2",
        "MESHSERVE_BILLING_WEBHOOK_BACKOFF_SECONDS": "[0.1, 0.5]",
    }
    if request.param == "postgres":
        env["MESHSERVE_BILLING_LEDGER_DSN"] = fresh_database(request.getfixturevalue("postgres"))
    else:
        env["MESHSERVE_BILLING_LEDGER"] = str(mesh.options.state_dir / f"ledger-{time.monotonic_ns()}.sqlite")
    m = Metered(mesh, env, receiver)
    try:
        yield m
    finally:
        m.stop()
        receiver.close()


def test_the_ledger_holds_what_the_clients_were_told(metered: Metered) -> None:
    told = [metered.chat("key_told", stream=i % 2 == 0) for i in range(10)]
    line = metered.ledger("key_told", 10)
    assert (line.requests, line.completion_tokens) == (10, sum(told))
    assert Decimal(line.cost) == PRICES.cost(MODEL, line.prompt_tokens, line.completion_tokens)
    time.sleep(1.5)
    assert metered.ledger("key_told", 10).requests == 10  # and nothing more arrives later


def test_a_whole_reply_that_failed_midway_bills_nothing_it_made_and_writes_it_off(metered: Metered) -> None:
    with pytest.raises(grpc.RpcError) as failed:
        metered.chat("key_failed", content="fail")  # the scripted engine fails after its 6 tokens
    # The engine failed on this request: INTERNAL for it, not UNAVAILABLE (the replica is not down).
    assert failed.value.code() == grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
    line = metered.ledger("key_failed", 1)
    # The client received none of the 6 tokens: none billed, all 6 on record as written off.
    assert (line.requests, line.completion_tokens, line.written_off_tokens) == (1, 0, 6)
    assert Decimal(line.cost) == PRICES.cost(MODEL, line.prompt_tokens, 0)


def test_a_stream_that_failed_midway_bills_the_tokens_its_client_received(metered: Metered) -> None:
    metered.chat("key_failed_stream", stream=True, content="fail")  # its error arrives in-band, after 6 tokens
    line = metered.ledger("key_failed_stream", 1)
    assert (line.requests, line.completion_tokens, line.written_off_tokens) == (1, 6, 0)


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
    with metered.mesh.channel(metered.billing, "router") as channel:
        stub = billing_pb2_grpc.BillingServiceStub(channel)
        first = stub.RecordUsage(iter([batch, batch]), timeout=10)
        again = stub.RecordUsage(iter([batch]), timeout=10)
    assert (first.accepted, first.duplicates, again.accepted, again.duplicates) == (1, 1, 0, 1)
    assert metered.ledger("key_twice", 1).requests == 1


def test_the_webhook_got_every_meter_event_of_the_ledger_once(metered: Metered) -> None:
    deadline = time.monotonic() + 30
    while True:
        lines = metered.lines()
        told = {line.key_id: (line.requests, line.prompt_tokens, line.completion_tokens) for line in lines}
        got = {key: metered.receiver.totals(key) for key in told}
        if got == told or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert told and got == told
    assert metered.receiver.failed == 3 and metered.receiver.bad_signatures == 0
    # Delivered once each, but for one batch at most: the kill -9 above may land between the webhook's
    # answer and billing writing it down. That batch comes again with the same identifiers, which the
    # provider deduplicates on (the totals above count each identifier once).
    resent = [ident for ident, n in metered.receiver.seen.items() if n > 1]
    assert len(resent) <= 100 and max(metered.receiver.seen.values()) <= 2


def test_an_unknown_outcome_is_invalid_argument(metered: Metered) -> None:
    bad = billing_pb2.RecordUsageRequest(records=[billing_pb2.UsageRecord(request_id="x", model=MODEL)])
    with metered.mesh.channel(metered.billing, "router") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            billing_pb2_grpc.BillingServiceStub(channel).RecordUsage(iter([bad]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
