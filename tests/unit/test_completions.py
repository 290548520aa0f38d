"""The router's completion logic over a fake replica: response shapes, usage, errors in and out of band."""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

import pytest

from meshserve.inference.v1 import inference_pb2 as ipb
from meshserve.llm.v1 import llm_pb2
from services.router.accounting import HOLD_IF_ROOM, HOLD_NONE, HOLD_REQUIRED, Reserved
from services.router.balancer import Balancer, LoadReport, ReplicaState, Strategy
from services.router.caller import Caller, RouteHints
from services.router.catalogue import Catalogue, ModelEntry, Version
from services.router.completions import Completions
from services.runtime.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unavailable

ANY = Caller(tenant="t", key_id="key_1", allowed_models=None)


class FakeReplica:
    """Replays scripted steps, then optionally fails."""

    def __init__(
        self, steps: list[ipb.GenerateResponse], fail_after: Exception | None = None, address: str = "fake:1"
    ) -> None:
        self.address = address
        self.steps = steps
        self.fail_after = fail_after
        self.requests: list[ipb.GenerateRequest] = []
        self.closed = False

    async def generate(self, request: ipb.GenerateRequest) -> AsyncGenerator[ipb.GenerateResponse, None]:
        self.requests.append(request)
        try:
            for step in self.steps:
                yield step
            if self.fail_after is not None:
                raise self.fail_after
        finally:
            self.closed = True

    async def count_tokens(self, request: ipb.GenerateRequest) -> tuple[int, int]:
        return 4, 100


def steps(*texts: str, finish: int = ipb.FINISH_REASON_STOP) -> list[ipb.GenerateResponse]:
    out = []
    for i, text in enumerate(texts, 1):
        out.append(ipb.GenerateResponse(text=text, token_ids=[i], prompt_tokens=4, completion_tokens=i))
    out[-1].finish_reason = finish  # type: ignore[assignment]
    return out


class FakeBudget:
    """Records counted requests, reservations and settlements; refuses tokens, or requests, when told to
    (as the rate-limit service does: a guess that does not fit is not held, and not refused)."""

    def __init__(self, refuse: Exception | None = None, refuse_requests: Exception | None = None) -> None:
        self.refuse = refuse
        self.refuse_requests = refuse_requests
        self.counted: list[str] = []
        self.reserved: list[tuple[str, int, int]] = []
        self.settled: list[tuple[str, int, int, str]] = []

    async def reserve(
        self,
        request_id: str,
        caller: Caller,
        model: str,
        prompt_tokens: int,
        max_tokens: int,
        count_request: bool = False,
        hold: str = HOLD_REQUIRED,
    ) -> Reserved:
        if count_request:
            if self.refuse_requests is not None:
                raise self.refuse_requests
            self.counted.append(request_id)
        if hold == HOLD_NONE:
            return Reserved(covers=False)
        if self.refuse is not None:
            if hold == HOLD_IF_ROOM:
                return Reserved(covers=False)
            raise self.refuse
        self.reserved.append((request_id, prompt_tokens, max_tokens))
        return Reserved(covers=True, held=True)

    def settle(
        self, request_id: str, caller: Caller, model: str, prompt_tokens: int, completion_tokens: int, outcome: str
    ) -> None:
        self.settled.append((request_id, prompt_tokens, completion_tokens, outcome))

    async def extend(self, request_id: str, caller: Caller, model: str, more_tokens: int) -> int | None:
        return None


class FakeDirectory:
    """Replicas by address, each reporting an idle engine."""

    def __init__(self, *replicas: FakeReplica) -> None:
        self.replicas = {r.address: r for r in replicas}
        self.state = {r.address: ReplicaState(r.address) for r in replicas}
        for state in self.state.values():
            state.reported(LoadReport(capacity=4))

    def states(self, targets: Sequence[str]) -> list[ReplicaState]:
        return [self.state[t] for t in targets if t in self.state]

    def replica(self, address: str) -> FakeReplica:
        return self.replicas[address]


def completions(*replicas: FakeReplica, budget: FakeBudget | None = None, **kw: Any) -> Completions:
    addresses = tuple(r.address for r in replicas)
    catalogue = Catalogue([ModelEntry("m", (Version("v1", 1.0, addresses),), 1700000000, "meshserve")])
    return Completions(lambda: catalogue, FakeDirectory(*replicas), clock=lambda: 1700000123.0, budget=budget, **kw)


def chat(**kw: object) -> llm_pb2.ChatCompletionParams:
    return llm_pb2.ChatCompletionParams(
        model="m",
        messages=[
            llm_pb2.ChatMessage(role="system", content="be brief"),
            llm_pb2.ChatMessage(role="user", content="hi"),
        ],
        **kw,  # type: ignore[arg-type]
    )


async def test_chat_joins_the_deltas_and_reports_usage() -> None:
    replica = FakeReplica(steps("Hel", "lo", finish=ipb.FINISH_REASON_LENGTH))
    reply = await completions(replica).chat(chat(max_tokens=2, temperature=0.0), ANY)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.created == 1700000123
    assert reply.choices[0].message.content == "Hello"
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (4, 2, 6)
    sent = replica.requests[0]
    assert [(t.role, t.content) for t in sent.input.conversation.turns] == [("system", "be brief"), ("user", "hi")]
    assert sent.sampling.max_tokens == 2 and sent.sampling.HasField("temperature")
    assert not sent.sampling.HasField("top_p")
    assert sent.request_id == reply.id


async def test_stream_sends_role_first_then_deltas_finish_and_usage() -> None:
    replica = FakeReplica(steps("a", "b"))
    params = chat(stream=True, stream_options=llm_pb2.StreamOptions(include_usage=True))
    chunks = [c async for c in completions(replica).chat_stream(params, ANY)]
    assert [c.choices[0].delta.content for c in chunks[:2]] == ["a", "b"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert not chunks[1].choices[0].delta.HasField("role")
    assert chunks[2].choices[0].finish_reason == "stop" and not chunks[2].choices[0].delta.HasField("content")
    assert not chunks[0].choices[0].HasField("finish_reason")
    assert list(chunks[3].choices) == [] and chunks[3].usage.completion_tokens == 2
    assert len({c.id for c in chunks}) == 1
    assert replica.closed


async def test_stream_without_include_usage_has_no_usage_chunk() -> None:
    chunks = [c async for c in completions(FakeReplica(steps("a"))).chat_stream(chat(stream=True), ANY)]
    assert not any(c.HasField("usage") for c in chunks)


async def test_an_error_after_the_first_token_goes_in_band() -> None:
    replica = FakeReplica(steps("a", finish=ipb.FINISH_REASON_UNSPECIFIED), fail_after=Unavailable("replica died"))
    chunks = [c async for c in completions(replica).chat_stream(chat(stream=True), ANY)]
    assert chunks[0].choices[0].delta.content == "a"
    assert chunks[-1].error.message == "replica died"
    assert chunks[-1].error.type == "server_error" and chunks[-1].error.code == "service_unavailable"


async def test_an_error_before_the_first_token_is_a_status() -> None:
    replica = FakeReplica([], fail_after=InvalidArgument("messages: too long"))
    with pytest.raises(InvalidArgument):
        [c async for c in completions(replica).chat_stream(chat(stream=True), ANY)]


async def test_an_engine_abort_is_unavailable_not_a_silent_finish() -> None:
    with pytest.raises(Unavailable):
        await completions(FakeReplica(steps("a", finish=ipb.FINISH_REASON_ABORT))).chat(chat(), ANY)


async def test_unknown_model_is_not_found_and_lists_the_known_ones() -> None:
    with pytest.raises(NotFound, match="available models: m"):
        await completions(FakeReplica(steps("a"))).chat(
            llm_pb2.ChatCompletionParams(model="x", messages=[llm_pb2.ChatMessage(role="user", content="hi")]), ANY
        )


async def test_a_key_limited_to_other_models_is_denied_before_any_engine_work() -> None:
    replica = FakeReplica(steps("a"))
    limited = Caller(tenant="t", key_id="key_2", allowed_models=frozenset({"other"}))
    with pytest.raises(PermissionDenied, match="key_2 may not use model 'm'"):
        await completions(replica).chat(chat(), limited)
    with pytest.raises(PermissionDenied):
        [c async for c in completions(replica).chat_stream(chat(stream=True), limited)]
    assert replica.requests == []
    assert list(completions(replica).list_models(limited).data) == []


async def test_text_completion_both_ways() -> None:
    params = llm_pb2.CompletionParams(model="m", prompt="Once", max_tokens=2)
    whole = await completions(FakeReplica(steps("up", "on"))).completion(params, ANY)
    assert whole.object == "text_completion" and whole.choices[0].text == "upon"
    params.stream = True
    chunks = [c async for c in completions(FakeReplica(steps("up", "on"))).completion_stream(params, ANY)]
    assert [c.choices[0].text for c in chunks] == ["up", "on", ""]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_models_come_from_the_catalogue() -> None:
    listed = completions(FakeReplica([])).list_models(ANY)
    assert listed.object == "list"
    assert [(m.id, m.object, m.created, m.owned_by) for m in listed.data] == [("m", "model", 1700000000, "meshserve")]


async def test_a_budget_reserves_before_generating_and_settles_what_was_produced() -> None:
    budget = FakeBudget()
    reply = await completions(FakeReplica(steps("a", "b", "c")), budget=budget).chat(chat(max_tokens=8), ANY)
    assert budget.reserved == [(reply.id, 4, 8)]
    assert budget.settled == [(reply.id, 4, 3, "completed")]
    # Without max_tokens the reservation is the rest of the context (100 - 4 prompt tokens).
    await completions(FakeReplica(steps("a")), budget=budget).chat(chat(), ANY)
    assert budget.reserved[-1][1:] == (4, 96)


async def test_a_refused_reservation_never_reaches_the_engine() -> None:
    replica = FakeReplica(steps("a"))
    budget = FakeBudget(refuse=ResourceExhausted("token limit reached", retry_after_seconds=3))
    with pytest.raises(ResourceExhausted):
        await completions(replica, budget=budget).chat(chat(), ANY)
    with pytest.raises(ResourceExhausted):
        await anext(completions(replica, budget=budget).chat_stream(chat(), ANY))
    assert replica.requests == [] and budget.settled == []


async def test_a_stream_closed_early_settles_as_cancelled_and_a_failure_as_failed() -> None:
    budget = FakeBudget()
    stream = completions(FakeReplica(steps("a", "b", "c", "d")), budget=budget).chat_stream(chat(), ANY)
    await anext(stream)
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    assert [s[2:] for s in budget.settled] == [(2, "cancelled")]
    failing = FakeReplica(steps("a", "b", finish=ipb.FINISH_REASON_UNSPECIFIED), fail_after=Unavailable("gone"))
    chunks = [c async for c in completions(failing, budget=budget).chat_stream(chat(), ANY)]
    assert chunks[-1].error.message == "gone"
    assert [s[2:] for s in budget.settled[1:]] == [(2, "failed")]


async def test_internal_callers_have_no_budget() -> None:
    budget = FakeBudget()
    internal = Caller(tenant="", key_id="internal", allowed_models=None)
    await completions(FakeReplica(steps("a")), budget=budget).chat(chat(), internal)
    assert budget.reserved == [] and budget.settled == []


async def test_a_replica_that_fails_before_the_first_token_is_ejected_and_another_serves() -> None:
    dead = FakeReplica([], fail_after=Unavailable("connection refused"), address="dead:1")
    alive = FakeReplica(steps("ok"), address="alive:1")
    service = completions(dead, alive, balancer=Balancer(Strategy.ROUND_ROBIN))
    for _ in range(3):
        reply = await service.chat(chat(), ANY)
        assert reply.choices[0].message.content == "ok"
    # Ejected after its first failure: tried once, never again during the ejection.
    assert len(dead.requests) == 1 and len(alive.requests) == 3


async def test_when_every_replica_fails_before_the_first_token_the_client_gets_unavailable() -> None:
    a = FakeReplica([], fail_after=Unavailable("a down"), address="a:1")
    b = FakeReplica([], fail_after=Unavailable("b down"), address="b:1")
    service = completions(a, b)
    with pytest.raises(Unavailable, match=r"2 failed, the last with: [ab] down"):
        await service.chat(chat(), ANY)
    # Both ejected: refused at once, with a retry delay, without calling either.
    with pytest.raises(Unavailable, match="no replica of m version v1 is in rotation") as later:
        await service.chat(chat(), ANY)
    assert later.value.retry_after_seconds
    assert len(a.requests) == len(b.requests) == 1


def two_versions(stable: FakeReplica, canary: FakeReplica, **kw: Any) -> Completions:
    catalogue = Catalogue(
        [
            ModelEntry(
                "m",
                (Version("stable", 90, (stable.address,)), Version("canary", 10, (canary.address,))),
                1700000000,
                "meshserve",
            )
        ]
    )
    return Completions(lambda: catalogue, FakeDirectory(stable, canary), rng=random.Random(7), **kw)


async def test_a_90_10_canary_gets_about_10_percent_of_1000_requests_and_pinning_overrides_it() -> None:
    stable, canary = FakeReplica(steps("s"), address="stable:1"), FakeReplica(steps("c"), address="canary:1")
    service = two_versions(stable, canary)
    for _ in range(1000):
        await service.chat(chat(), ANY)
    assert 70 <= len(canary.requests) <= 130, len(canary.requests)
    assert len(stable.requests) + len(canary.requests) == 1000
    pinned = await service.chat(chat(), ANY, RouteHints(version="canary"))
    assert pinned.choices[0].message.content == "c"
    with pytest.raises(NotFound, match="no version 'v9'; its versions: stable, canary"):
        await service.chat(chat(), ANY, RouteHints(version="v9"))


async def test_a_session_stays_on_one_replica() -> None:
    a, b, c = (FakeReplica(steps("x"), address=f"{n}:1") for n in "abc")
    service = completions(a, b, c)
    for _ in range(9):
        await service.chat(chat(), ANY, RouteHints(session="conversation-42"))
    assert sorted(len(r.requests) for r in (a, b, c)) == [0, 0, 9]


async def test_a_version_naming_a_scheme_takes_only_replicas_that_report_running_it() -> None:
    quantized, stale = FakeReplica(steps("q"), address="quantized:1"), FakeReplica(steps("s"), address="stale:1")
    directory = FakeDirectory(quantized, stale)
    directory.state["stale:1"].reported(LoadReport(capacity=4, quantization="none", kv_cache_dtype="auto"))
    scheme = (("kv_cache_dtype", "auto"), ("quantization", "compressed-tensors w8a8-fp8"))
    version = Version("v1", 1.0, ("quantized:1", "stale:1"), scheme=scheme)
    catalogue = Catalogue([ModelEntry("m", (version,), 1700000000, "meshserve")])
    service = Completions(lambda: catalogue, directory, clock=lambda: 1700000123.0)
    directory.state["quantized:1"].reported(
        LoadReport(capacity=4, quantization="compressed-tensors w8a8-fp8", kv_cache_dtype="auto")
    )
    for _ in range(6):
        await service.chat(chat(), ANY)
    assert (len(quantized.requests), len(stale.requests)) == (6, 0)
    [listed] = service.list_models(ANY).data
    assert (listed.quantization, listed.kv_cache_dtype) == ("compressed-tensors w8a8-fp8", "auto")
    assert service.unready_models() == []
    # With no replica running it, the model has none in rotation: not ready, and a request is refused.
    directory.state["quantized:1"].reported(LoadReport(capacity=4, quantization="none", kv_cache_dtype="auto"))
    assert service.unready_models() == ["m"]
    with pytest.raises(Unavailable):
        await service.chat(chat(), ANY)
    assert len(stale.requests) == 0


def test_the_catalogue_reads_a_scheme_per_model_and_per_version(tmp_path: Path) -> None:
    path = tmp_path / "catalogue.yaml"
    path.write_text(
        "models:\n"
        "  - id: m\n"
        "    kv_cache_dtype: fp8\n"
        "    versions:\n"
        "      - {name: v1, weight: 90, replicas: ['a:1']}\n"
        "      - {name: v2, weight: 10, replicas: ['b:1'], quantization: compressed-tensors w8a8-fp8}\n"
    )
    v1, v2 = Catalogue.from_yaml(path).get("m").versions
    assert v1.scheme == (("kv_cache_dtype", "fp8"),)
    assert v2.scheme == (("kv_cache_dtype", "fp8"), ("quantization", "compressed-tensors w8a8-fp8"))
    path.write_text("models:\n  - {id: m, replicas: ['a:1'], quantization: ''}\n")
    with pytest.raises(InvalidArgument, match="quantization: must be a scheme"):
        Catalogue.from_yaml(path)


async def test_v1_generate_asks_its_budgets_for_all_it_may_generate_and_is_capped_at_what_they_pay() -> None:
    from services.router.accounting import Allowance, Metered
    from services.router.completions import _within_allowance
    from services.runtime.errors import QuotaExceeded

    asked: list[int] = []

    def budgets(room: int | None) -> Allowance:
        async def extend(more: int) -> int | None:
            asked.append(more)
            return room

        return Allowance(tokens=10, extend=extend)

    request = ipb.GenerateRequest(request_id="r", model="m", sampling=ipb.SamplingParams(max_tokens=100))
    # Room for everything: the request goes as it is.
    metered = Metered(started=0.0, budgeted=True, allowance=budgets(100))
    assert await _within_allowance(request, metered, 100) is request and asked == [90]
    # Room for 40 of 100: max_tokens lowered to 40 (the original untouched), the request marked stopped.
    metered = Metered(started=0.0, budgeted=True, allowance=budgets(40))
    capped = await _within_allowance(request, metered, 100)
    assert capped.sampling.max_tokens == 40 and request.sampling.max_tokens == 100
    assert metered.allowance.stopped
    # No budget caps it (None): as it is.
    metered = Metered(started=0.0, budgeted=True, allowance=budgets(None))
    assert await _within_allowance(request, metered, 100) is request and not metered.allowance.stopped
    # No room at all: refused, as at admission.
    metered = Metered(started=0.0, budgeted=True, allowance=budgets(0))
    with pytest.raises(QuotaExceeded, match="spend budget exhausted"):
        await _within_allowance(request, metered, 100)
