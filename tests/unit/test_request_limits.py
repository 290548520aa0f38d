"""A generation's request limits, checked by the router's first reservation instead of at the edge: counted
once, before anything waits or is answered, and a key over its limit refused by the router alone until the
limit frees (a budget that records every call stands in for the rate-limit service)."""

from __future__ import annotations

import asyncio

import pytest

from services.router.accounting import Metered
from services.router.admission import Admission
from services.router.caller import Caller
from services.runtime.errors import NotFound, ResourceExhausted
from tests.unit.test_completions import ANY, FakeBudget, FakeReplica, chat, completions, steps

OVER = ResourceExhausted("rate limit exceeded (2 requests per 60 s per key); retry after 3.0 s", retry_after_seconds=3)


async def test_each_generation_is_counted_once_by_its_first_reservation_and_never_by_the_measured_one() -> None:
    budget = FakeBudget()
    service = completions(FakeReplica(steps("a", "b")), budget=budget)
    reply = await service.chat(chat(max_tokens=8), ANY)
    assert budget.counted == [reply.id]
    assert budget.reserved == [(reply.id, 4, 8)]  # the measured counts, without counting the request again
    chunks = [c async for c in service.chat_stream(chat(max_tokens=8), ANY)]
    assert budget.counted == [reply.id, chunks[0].id]


async def test_a_key_over_its_request_limit_never_reaches_a_replica_and_is_then_refused_by_the_router_alone() -> None:
    replica = FakeReplica(steps("a"))
    budget = FakeBudget(refuse_requests=OVER)
    service = completions(replica, budget=budget)
    with pytest.raises(ResourceExhausted, match="2 requests per 60 s per key") as refused:
        await service.chat(chat(), ANY)
    assert refused.value.retry_after_seconds == 3
    budget.refuse_requests = None  # the service would admit now; the router remembers the refusal's time
    with pytest.raises(ResourceExhausted, match=r"2 requests per 60 s per key\); retry after") as again:
        await anext(service.chat_stream(chat(), ANY))
    assert again.value.retry_after_seconds is not None and 0 < again.value.retry_after_seconds <= 3
    assert replica.requests == [] and budget.counted == [] and budget.settled == []
    # Another key, or the same key for another model, is counted as usual.
    other = Caller(tenant="t", key_id="key_2", allowed_models=None)
    await service.chat(chat(), other)
    assert len(budget.counted) == 1


async def test_the_limit_is_heard_before_an_unknown_model_or_a_refused_permission() -> None:
    budget = FakeBudget()
    service = completions(FakeReplica(steps("a")), budget=budget)
    params = chat()
    params.model = "nope"
    with pytest.raises(NotFound):
        await service.chat(params, ANY)
    assert len(budget.counted) == 1  # counted as the edge counted it: whatever the answer
    budget.refuse_requests = OVER
    params.model = "other"
    with pytest.raises(ResourceExhausted):
        await service.chat(params, ANY)


async def test_a_request_over_its_limit_never_waits_in_the_queue() -> None:
    admission = Admission(queue_size=4, queue_timeout_seconds=30)
    budget = FakeBudget(refuse_requests=OVER)
    service = completions(FakeReplica(steps("a")), budget=budget, admission=admission)
    async with admission.slot(("m", "v1"), lambda: 1):  # the only slot is taken: a request would queue
        with pytest.raises(ResourceExhausted, match="requests per 60 s"):
            await asyncio.wait_for(service.chat(chat(), ANY), timeout=5)
        assert admission.depth(("m", "v1")) == 0


async def test_internal_callers_are_not_counted() -> None:
    budget = FakeBudget(refuse_requests=OVER)
    metered = Metered(started=0.0, budgeted=False)
    pipeline = completions(FakeReplica(steps("a")), budget=budget).pipeline
    pipeline.count("req", Caller("", "internal", None), "m", metered, None)
    assert metered.early is None


async def test_an_unreachable_rate_limit_service_follows_each_kinds_failure_mode() -> None:
    from services.router.budget import GrpcTokenBudget
    from services.runtime.errors import Unavailable

    closed_for_requests = GrpcTokenBudget("127.0.0.1:1", fail_open=True, requests_fail_open=False)
    with pytest.raises(Unavailable, match="request limits cannot be checked"):
        await closed_for_requests.reserve("r", ANY, "m", 0, 0, count_request=True)
    # Tokens open: generated without a reservation.
    assert (await closed_for_requests.reserve("r", ANY, "m", 10, 10)).covers
    await closed_for_requests.close()
    open_for_requests = GrpcTokenBudget("127.0.0.1:1", fail_open=False, requests_fail_open=True)
    # Let through uncounted, and the tokens are left to the measured reservation (under their own mode).
    assert not (await open_for_requests.reserve("r", ANY, "m", 0, 0, count_request=True)).covers
    with pytest.raises(Unavailable, match="token limits cannot be checked"):
        await open_for_requests.reserve("r", ANY, "m", 10, 10)
    await open_for_requests.close()
