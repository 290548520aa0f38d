"""The response cache's rules and its place in the OpenAI API's flow (services/router/cache.py), with fakes."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from meshserve.billing.v1 import billing_pb2
from meshserve.inference.v1 import inference_pb2 as ipb
from services.router import cache
from services.router.cache import Answer, Plan
from services.router.caller import Caller, RouteHints
from services.router.catalogue import Catalogue, ModelEntry, Version
from services.router.completions import Completions
from services.router.openai_api import CHAT, COMPLETIONS, OpenAIApi, ResponseMeta
from services.runtime.errors import InvalidArgument, ResourceExhausted
from tests.unit.test_completions import FakeBudget, FakeDirectory

ACME = Caller(tenant="acme", key_id="key_a", allowed_models=None)
OTHER = Caller(tenant="other", key_id="key_o", allowed_models=None)
DONE = b"data: [DONE]\n\n"
STOP = ipb.FINISH_REASON_STOP
QUESTION = [{"role": "user", "content": "Capital of France?"}]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0, "n": 1}, True),
        ({"seed": 7, "temperature": 0.9}, True),
        ({"temperature": 0.7}, False),
        ({}, False),  # OpenAI's default temperature is 1
        ({"temperature": 0, "n": 2}, False),
        ({"temperature": False}, False),
        ({"seed": True}, False),
    ],
)
def test_deterministic_requests_are_greedy_or_seeded_with_one_choice(fields: dict[str, Any], expected: bool) -> None:
    assert cache.deterministic(fields) is expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, (True, True)),
        ("no-cache", (False, True)),
        ("max-age=0, No-Cache", (False, True)),
        ("no-store", (False, False)),
        ("max-age=60", (True, True)),
    ],
)
def test_cache_control_says_what_the_cache_may_do(header: str | None, expected: tuple[bool, bool]) -> None:
    assert cache.directive(header) == expected


def test_the_key_is_the_canonical_request_per_owner_version_endpoint_and_stream() -> None:
    fields = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
    key = cache.key_of("m", "acme", "v1", CHAT, False, fields)
    assert key == cache.key_of("m", "acme", "v1", CHAT, False, dict(reversed(list(fields.items()))))
    assert cache.model_of(key) == "m"
    others = {
        cache.key_of("m", "other", "v1", CHAT, False, fields),
        cache.key_of("m", "*", "v1", CHAT, False, fields),
        cache.key_of("m", "acme", "v2", CHAT, False, fields),
        cache.key_of("m", "acme", "v1", COMPLETIONS, False, fields),
        cache.key_of("m", "acme", "v1", CHAT, True, fields),
        cache.key_of("m", "acme", "v1", CHAT, False, {**fields, "max_tokens": 5}),
    }
    assert key not in others and len(others) == 6


def test_an_answer_round_trips_and_replays_under_a_new_id() -> None:
    answer = Answer("chatcmpl-old", (b'data: {"id":"chatcmpl-old"}\n\n', DONE), 5, 2)
    assert Answer.decode(answer.encode()) == answer
    assert answer.replayed("chatcmpl-new") == (b'data: {"id":"chatcmpl-new"}\n\n', DONE)


def test_the_catalogue_says_whose_answers_are_cached(tmp_path: Path) -> None:
    path = tmp_path / "catalogue.yaml"
    path.write_text(
        "models:\n"
        "  - {id: a, replicas: ['h:1']}\n"
        "  - {id: b, replicas: ['h:1'], cache: off}\n"
        "  - {id: c, replicas: ['h:1'], cache: tenant}\n"
        "  - {id: d, replicas: ['h:1'], cache: shared}\n"
    )
    assert [e.cache for e in Catalogue.from_yaml(path).entries()] == ["off", "off", "tenant", "shared"]
    path.write_text("models:\n  - {id: a, replicas: ['h:1'], cache: everyone}\n")
    with pytest.raises(InvalidArgument, match=r"models\[0\]\.cache"):
        Catalogue.from_yaml(path)


class ServingReplica:
    """Answers OpenAI bodies as vLLM's serving layer does, counting the requests that reach it."""

    address = "fake:1"

    def __init__(self) -> None:
        self.served: list[ipb.ServeStart] = []

    async def serve(
        self,
        start: ipb.ServeStart,
        reserve: Callable[[int, int], Awaitable[object]] | None,
        cover: Any = None,
        allowance: Any = None,
        whole: bool = False,
    ) -> AsyncGenerator[ipb.ServeResponse, None]:
        self.served.append(start)
        if reserve is not None:
            await reserve(5, 16)
        request_id = f"chatcmpl-{start.request_id}"
        body = json.loads(start.body)
        if not body.get("stream"):
            data = json.dumps({"id": request_id, "choices": [{"message": {"content": "Paris"}}]}).encode()
            yield ipb.ServeResponse(data=data, prompt_tokens=5, completion_tokens=2, finish_reason=STOP)
            return
        for i, text in enumerate(("Par", "is")):
            data = f'data: {{"id":"{request_id}","choices":[{{"delta":{{"content":"{text}"}}}}]}}\n\n'.encode()
            yield ipb.ServeResponse(data=data, prompt_tokens=5, completion_tokens=i + 1)
        yield ipb.ServeResponse(data=DONE, prompt_tokens=5, completion_tokens=2, finish_reason=STOP)


class FakeCache(cache.ResponseCache):
    """Answers in a dict, kept at once."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self._max_entry = 1 << 20

    async def get(self, plan: Plan) -> Answer | None:
        return self.answers.get(plan.key)

    def keep(self, plan: Plan, answer: Answer) -> None:
        if plan.keep:
            self.answers[plan.key] = answer


class Usage:
    def __init__(self) -> None:
        self.records: list[billing_pb2.UsageRecord] = []

    def record(self, record: billing_pb2.UsageRecord) -> None:
        self.records.append(record)


def api(scope: str = "tenant", budget: FakeBudget | None = None) -> tuple[OpenAIApi, ServingReplica, Usage]:
    replica, usage = ServingReplica(), Usage()
    entry = ModelEntry("m", (Version("v1", 1.0, (replica.address,)),), 1700000000, "meshserve", cache=scope)
    completions = Completions(lambda: Catalogue([entry]), FakeDirectory(replica), budget=budget, usage=usage)  # type: ignore[arg-type]
    return OpenAIApi(completions.pipeline, answers=FakeCache()), replica, usage


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": QUESTION, **fields}).encode()


async def whole(
    openai: OpenAIApi, data: bytes, caller: Caller = ACME, hints: RouteHints | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    meta = ResponseMeta()
    out = await openai.whole(CHAT, data, caller, hints or RouteHints(), meta)
    return json.loads(out), dict(meta.headers())


async def test_a_second_deterministic_request_is_a_hit_counted_and_recorded_as_cached() -> None:
    budget = FakeBudget()
    openai, replica, usage = api(budget=budget)
    first, said = await whole(openai, chat(temperature=0))
    assert said[cache.HEADER] == cache.MISS
    again, said = await whole(openai, chat(temperature=0))
    assert said[cache.HEADER] == cache.HIT
    assert len(replica.served) == 1  # no engine worked for the hit
    assert again["choices"] == first["choices"] and again["id"] != first["id"]
    assert len(budget.counted) == 2  # a hit counts against request limits
    assert [r.outcome for r in usage.records] == [billing_pb2.OUTCOME_COMPLETED, billing_pb2.OUTCOME_CACHED]
    hit = usage.records[1]
    assert (hit.request_id, hit.prompt_tokens, hit.completion_tokens) == (again["id"], 5, 2)


async def test_a_hit_over_its_request_limit_is_refused() -> None:
    budget = FakeBudget()
    openai, _, usage = api(budget=budget)
    await whole(openai, chat(temperature=0))
    budget.refuse_requests = ResourceExhausted("request limit reached")
    with pytest.raises(ResourceExhausted):
        await whole(openai, chat(temperature=0))
    assert len(usage.records) == 1


async def test_tenants_see_their_own_answers_unless_the_model_shares_them() -> None:
    openai, replica, _ = api("tenant")
    await whole(openai, chat(temperature=0))
    _, said = await whole(openai, chat(temperature=0), OTHER)
    assert (said[cache.HEADER], len(replica.served)) == (cache.MISS, 2)
    openai, replica, _ = api("shared")
    await whole(openai, chat(temperature=0))
    _, said = await whole(openai, chat(temperature=0), OTHER)
    assert (said[cache.HEADER], len(replica.served)) == (cache.HIT, 1)


async def test_no_cache_bypasses_and_non_deterministic_requests_are_answered_afresh() -> None:
    openai, replica, _ = api()
    await whole(openai, chat(temperature=0))
    _, said = await whole(openai, chat(temperature=0), hints=RouteHints(cache_control="no-cache"))
    assert (said[cache.HEADER], len(replica.served)) == (cache.MISS, 2)
    for _ in range(2):
        _, said = await whole(openai, chat(temperature=0.8))
    assert (said[cache.HEADER], len(replica.served)) == (cache.MISS, 4)


async def test_a_model_without_a_cache_says_nothing_of_it() -> None:
    openai, replica, _ = api("off")
    for _ in range(2):
        _, said = await whole(openai, chat(temperature=0))
    assert cache.HEADER not in said and len(replica.served) == 2


async def test_a_streamed_hit_replays_the_events_with_done() -> None:
    openai, replica, usage = api()

    async def events() -> tuple[list[bytes], dict[str, str]]:
        meta = ResponseMeta()
        out = [e async for e in openai.stream(CHAT, chat(temperature=0, stream=True), ACME, RouteHints(), meta)]
        return out, dict(meta.headers())

    first, said = await events()
    assert said[cache.HEADER] == cache.MISS
    again, said = await events()
    assert said[cache.HEADER] == cache.HIT and len(replica.served) == 1
    assert again[-1] == DONE and len(again) == len(first) == 3
    assert [e.split(b'"choices"')[1] for e in again[:-1]] == [e.split(b'"choices"')[1] for e in first[:-1]]
    # A whole request is not answered with a stream's events, nor a stream with a whole reply.
    _, said = await whole(openai, chat(temperature=0))
    assert said[cache.HEADER] == cache.MISS
    assert [r.outcome for r in usage.records][-2:] == [billing_pb2.OUTCOME_CACHED, billing_pb2.OUTCOME_COMPLETED]
