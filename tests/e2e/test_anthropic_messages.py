"""Anthropic's Messages API through the edge with Anthropic's own SDK, side by side with vLLM's own server.

Both serve the same model folder with the same settings; at temperature 0 they must give the same answers.
Where vLLM breaks Anthropic's contract (message ids that are not msg_..., error types that are Python
exception names, a temperature above 1), the test asserts the contract.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import grpc
import httpx
import pytest
from google.api import httpbody_pb2

from meshserve.llm.v2 import llm_pb2_grpc as llm_v2_pb2_grpc
from services.mesh.local import LocalMesh
from tests.e2e.helpers import MODEL, bearer, create_key
from tests.e2e.test_billing import ledger_line

pytestmark = pytest.mark.mesh

ASK = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
# Anthropic's SDK no longer takes sampling parameters; the API (and vLLM's) still reads temperature.
GREEDY = {"temperature": 0}


def client(mesh: LocalMesh, key: str | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=mesh.edge_url, api_key=key or mesh.user_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def vllm(vllm_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=vllm_url, api_key="unused", max_retries=0, timeout=120)


def both(mesh: LocalMesh, vllm: anthropic.Anthropic) -> list[anthropic.Anthropic]:
    return [client(mesh), vllm]


def text_of(message: Any) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_a_message_gives_vllms_answer_with_anthropics_ids(mesh: LocalMesh, vllm: anthropic.Anthropic) -> None:
    ask: dict[str, Any] = {"model": MODEL, "messages": ASK, "max_tokens": 12, "extra_body": GREEDY}
    ours, theirs = [c.messages.create(**ask, system="Answer in one word.") for c in both(mesh, vllm)]
    assert text_of(ours) == text_of(theirs) and "Paris" in text_of(ours)
    assert ours.stop_reason == theirs.stop_reason
    assert ours.usage.input_tokens == theirs.usage.input_tokens
    assert ours.usage.output_tokens == theirs.usage.output_tokens
    assert ours.id.startswith("msg_") and ours.type == "message" and ours.role == "assistant"


def test_a_streamed_message_gives_the_whole_ones_text_and_usage(mesh: LocalMesh, vllm: anthropic.Anthropic) -> None:
    ask: dict[str, Any] = {"model": MODEL, "messages": ASK, "max_tokens": 12, "extra_body": GREEDY}
    finals = []
    for c in both(mesh, vllm):
        with c.messages.stream(**ask) as stream:
            streamed = "".join(stream.text_stream)
            finals.append((streamed, stream.get_final_message()))
    (ours_text, ours), (theirs_text, theirs) = finals
    assert ours_text == theirs_text == text_of(client(mesh).messages.create(**ask))
    assert ours.usage.output_tokens == theirs.usage.output_tokens
    assert ours.stop_reason == theirs.stop_reason
    assert ours.id.startswith("msg_")


def tool_uses(message: Any) -> list[tuple[str, object]]:
    return [(block.name, block.input) for block in message.content if block.type == "tool_use"]


def test_a_forced_tool_gives_vllms_tool_use(mesh: LocalMesh, vllm: anthropic.Anthropic) -> None:
    ask: dict[str, Any] = {
        "model": MODEL,
        "messages": WEATHER_QUESTION,
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "max_tokens": 60,
        "extra_body": GREEDY,
    }
    ours, theirs = [c.messages.create(**ask) for c in both(mesh, vllm)]
    uses = tool_uses(ours)
    assert uses and uses[0][0] == "get_weather" and isinstance(uses[0][1], dict)
    assert uses == tool_uses(theirs)
    assert ours.stop_reason == theirs.stop_reason == "tool_use"
    with client(mesh).messages.stream(**ask) as stream:
        assert tool_uses(stream.get_final_message()) == uses
    tool_id = next(block.id for block in ours.content if block.type == "tool_use")
    turns = [
        *WEATHER_QUESTION,
        {"role": "assistant", "content": [{"type": "tool_use", "id": tool_id, "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": "Sunny, 21 C"}]},
    ]
    answers = [
        c.messages.create(model=MODEL, messages=turns, tools=[WEATHER], max_tokens=20, extra_body=GREEDY)  # type: ignore[arg-type]
        for c in both(mesh, vllm)
    ]
    assert text_of(answers[0]) == text_of(answers[1])


def test_a_wrong_or_missing_key_is_anthropics_authentication_error(mesh: LocalMesh) -> None:
    for key in ("msk-" + "x" * 40, "not-a-key"):
        with pytest.raises(anthropic.AuthenticationError) as wrong:
            client(mesh, key).messages.create(model=MODEL, messages=ASK, max_tokens=4)
        assert wrong.value.body["type"] == "error"  # type: ignore[index]
        assert wrong.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    missing = httpx.post(f"{mesh.edge_url}/v1/messages", json={"model": MODEL, "messages": ASK, "max_tokens": 4})
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"


def post(mesh: LocalMesh, body: dict[str, Any]) -> httpx.Response:
    headers = {"x-api-key": mesh.user_key, "anthropic-version": "2023-06-01"}
    return httpx.post(f"{mesh.edge_url}/v1/messages", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"temperature": 1.5}, "temperature"),
        ({"messages": [{"role": "system", "content": "hi"}]}, "messages[0].role"),
        ({"top_k": -1}, "top_k"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_what_anthropics_contract_forbids_is_an_invalid_request_error(
    mesh: LocalMesh, change: dict[str, Any], named: str
) -> None:
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, **change}
    r = post(mesh, {k: v for k, v in body.items() if v is not None})
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert named in r.json()["error"]["message"]


def test_a_stream_ends_with_message_stop_and_grpc_clients_get_the_same_json(mesh: LocalMesh) -> None:
    r = post(mesh, {"model": MODEL, "messages": ASK, "max_tokens": 4, "temperature": 0, "stream": True})
    events = [line for line in r.text.splitlines() if line.startswith("event: ")]
    assert r.status_code == 200 and events[0] == "event: message_start" and events[-1] == "event: message_stop"
    whole = post(mesh, {"model": MODEL, "messages": ASK, "max_tokens": 4, **GREEDY})
    with grpc.insecure_channel(f"{mesh.edge.host}:{mesh.edge.port}") as channel:
        stub = llm_v2_pb2_grpc.LlmServiceStub(channel)
        body = httpbody_pb2.HttpBody(content_type="application/json", data=whole.request.content)
        native = stub.CreateMessage(body, metadata=bearer(mesh.user_key), timeout=60)
    assert [b["text"] for b in json.loads(native.data)["content"]] == [b["text"] for b in whole.json()["content"]]


def test_messages_are_billed_as_their_callers_were_told(mesh: LocalMesh) -> None:
    key, secret = create_key(mesh, "anthropic-billed")
    sdk = client(mesh, secret)
    told = [sdk.messages.create(model=MODEL, messages=ASK, max_tokens=n, extra_body=GREEDY).usage for n in (3, 5)]
    with sdk.messages.stream(model=MODEL, messages=ASK, max_tokens=4, extra_body=GREEDY) as stream:
        told.append(stream.get_final_message().usage)
    line = ledger_line(mesh, key.key_id, 3)
    assert line.requests == 3
    assert line.prompt_tokens == sum(u.input_tokens for u in told)
    assert line.completion_tokens == sum(u.output_tokens for u in told)
