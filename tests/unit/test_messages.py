"""Anthropic's Messages API in the router (its contract, its opening, its error events) and the replica's ids."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.inference.openai_serving import _named_message
from services.router import messages
from services.router.openai_api import MESSAGES, parse
from services.runtime.errors import InvalidArgument, ResourceExhausted

ASK = [{"role": "user", "content": "What is the capital of France?"}]


def body(**change: Any) -> bytes:
    fields = {"model": "m", "messages": ASK, "max_tokens": 8, **change}
    return json.dumps({k: v for k, v in fields.items() if v is not None}).encode()


def test_a_message_request_is_parsed_with_its_stream_flag_opening_and_most_generated() -> None:
    parsed = parse(MESSAGES, body(system=[{"type": "text", "text": "Be brief."}]), True, 10)
    assert parsed.model == "m" and parsed.most_generated == 8
    assert json.loads(parsed.data)["stream"] is True
    assert parsed.opening.startswith("system\nBe brief.\n")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"max_tokens": None}, "max_tokens: is required"),
        ({"max_tokens": 0}, "max_tokens: must be at least 1"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": 1.01}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages[0].content"),
        ({"system": 3}, "system"),
        ({"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
        ({"stop_sequences": "stop"}, "stop_sequences"),
    ],
)
def test_what_anthropics_contract_forbids_is_refused_naming_the_field(change: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidArgument, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse(MESSAGES, body(**change), False, 10)


def test_a_non_finite_number_is_refused_before_anything_is_reserved() -> None:
    with pytest.raises(InvalidArgument, match="temperature: must be a finite number"):
        parse(MESSAGES, body().replace(b'"max_tokens": 8', b'"max_tokens": 8, "temperature": NaN'), False, 10)


def test_an_error_after_a_stream_began_is_anthropics_error_event() -> None:
    event = messages.error_event(ResourceExhausted("token budget spent"))
    head, data = event.decode().split("\n", 1)
    assert head == "event: error"
    assert json.loads(data.removeprefix("data: ")) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "token budget spent"},
    }
    hidden = json.loads(messages.error_event(RuntimeError("secret detail")).decode().split("data: ")[1])
    assert hidden["error"] == {"type": "api_error", "message": "internal error while generating"}


def test_the_replica_names_a_streamed_message_with_the_requests_id() -> None:
    start = 'event: message_start\ndata: {"type":"message_start","message":{"id":"chatcmpl-1","role":"assistant"}}\n\n'
    named = _named_message(start, "msg_abc")
    assert named.startswith("event: message_start\ndata: ") and named.endswith("\n\n")
    assert json.loads(named.split("data: ")[1])["message"] == {"id": "msg_abc", "role": "assistant"}
    other = 'event: ping\ndata: {"type":"ping"}\n\n'
    assert _named_message(other, "msg_abc") == other
