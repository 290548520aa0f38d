"""The Responses API's contract and the router's store of responses (services/router/responses.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.router import responses
from services.router.responses import ResponseStore, Turn
from services.runtime.errors import InvalidArgument, NotFound


class FakeRedis:
    """GET and SET with a TTL, as the store uses them."""

    def __init__(self, fail: bool = False) -> None:
        self.values: dict[str, str] = {}
        self.ttls: dict[str, int] = {}
        self.fail = fail

    async def get(self, name: str) -> str | None:
        return self.values.get(name)

    async def set(self, name: str, value: str, ex: int) -> None:
        if self.fail:
            raise ConnectionError("redis is away")
        self.values[name], self.ttls[name] = value, ex


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "input": "Hi", **fields}).encode()


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 2.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"input": []}, "input"),
        ({"input": {"role": "user"}}, "input"),
        ({"input": [{"content": "no type or role"}]}, "input[0]"),
        ({"instructions": ["a"]}, "instructions"),
        ({"background": True}, "background"),
        ({"previous_response_id": 7}, "previous_response_id"),
    ],
)
def test_the_contract_names_the_field(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidArgument, match=named.replace("[", r"\[")):
        responses.contract({"model": "m", "input": "Hi", **fields})


def test_turns_read_instructions_first_then_the_items_text() -> None:
    fields = {
        "instructions": "Be brief.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
    }
    assert responses.turns(fields) == [("system", "Be brief."), ("user", "Hi")]
    assert responses.turns({"input": "Hello"}) == [("user", "Hello")]


async def test_a_stored_turn_is_continued_with_its_input_and_output_before_the_new_input() -> None:
    redis = FakeRedis()
    store = ResponseStore(redis, ttl_seconds=60)
    first = await store.turn("acme", body(instructions="Be brief."))
    assert first.store and first.data == body(instructions="Be brief.")  # passed on as written
    answer = {"id": "resp_1", "output": [{"type": "message", "role": "assistant", "content": []}]}
    stamped = json.loads(await responses.finish_whole(store, first, json.dumps(answer).encode()))
    assert stamped["store"] is True and stamped["previous_response_id"] is None
    assert list(redis.ttls.values()) == [60]

    second = await store.turn("acme", body(input=[{"role": "user", "content": "More"}], previous_response_id="resp_1"))
    sent = json.loads(second.data)
    assert "previous_response_id" not in sent and "store" not in sent and "instructions" not in sent
    assert sent["input"] == [
        {"type": "message", "role": "user", "content": "Hi"},
        answer["output"][0],
        {"role": "user", "content": "More"},
    ]
    assert second.stamped({"id": "resp_2"})["previous_response_id"] == "resp_1"
    assert json.loads(await store.get("acme", "resp_1"))["id"] == "resp_1"


async def test_another_tenant_an_unknown_id_and_an_unstored_turn_are_not_found() -> None:
    store = ResponseStore(FakeRedis(), ttl_seconds=60)
    turn = await store.turn("acme", body())
    await store.keep(turn, {"id": "resp_1", "output": []})
    unstored = await store.turn("acme", body(store=False))
    await store.keep(unstored, {"id": "resp_2", "output": []})
    for tenant, response_id in (("other", "resp_1"), ("acme", "resp_x"), ("acme", "resp_2")):
        with pytest.raises(NotFound):
            await store.get(tenant, response_id)
    with pytest.raises(NotFound):
        await store.turn("other", body(previous_response_id="resp_1"))


async def test_without_a_store_nothing_is_kept_and_a_previous_id_is_refused() -> None:
    store = ResponseStore(None, ttl_seconds=60)
    turn = await store.turn("acme", body())
    assert not turn.store
    with pytest.raises(InvalidArgument, match="previous_response_id"):
        await store.turn("acme", body(previous_response_id="resp_1"))


async def test_a_failed_store_answers_anyway_and_says_it_did_not_store() -> None:
    store = ResponseStore(FakeRedis(fail=True), ttl_seconds=60)
    turn = await store.turn("acme", body())
    answer = json.loads(await responses.finish_whole(store, turn, b'{"id": "resp_1", "output": []}'))
    assert answer["store"] is False


async def test_stream_events_carry_the_stamped_response_and_the_completed_one_is_stored() -> None:
    redis = FakeRedis()
    store = ResponseStore(redis, ttl_seconds=60)
    turn = Turn(body(), "acme", store=True, previous_id="resp_0", conversation=[])
    delta = b'event: response.output_text.delta\ndata: {"delta":"Hi"}\n\n'
    assert await responses.finish_event(store, turn, delta) == delta
    completed = b'event: response.completed\ndata: {"response":{"id":"resp_1","store":false}}\n\n'
    out = await responses.finish_event(store, turn, completed)
    head, _, data = out.partition(b"data: ")
    assert head == b"event: response.completed\n" and out.endswith(b"\n\n")
    assert json.loads(data)["response"] == {"id": "resp_1", "store": True, "previous_response_id": "resp_0"}
    assert json.loads(await store.get("acme", "resp_1"))["previous_response_id"] == "resp_0"


async def test_a_body_too_deep_or_not_json_is_left_to_the_contracts_parse() -> None:
    store = ResponseStore(FakeRedis(), ttl_seconds=60)
    for data in (b"[" * 100_000, b"{not json", b"[1]"):
        turn = await store.turn("acme", data)
        assert turn.data == data and not turn.store
