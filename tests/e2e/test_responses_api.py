"""OpenAI's Responses API through the edge with OpenAI's own SDK, side by side with vLLM's own server.

Both serve the same model folder with the same settings; at temperature 0 they must give the same answers.
vLLM's server keeps no responses by default (`previous_response_id` is its 404); the mesh keeps them in
Redis per tenant, so a conversation continued by id must answer what vLLM answers to the same conversation
sent whole (the stateless form `store: false` clients use).
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import httpx
import openai
import pytest
from google.api import httpbody_pb2

from meshserve.llm.v2 import llm_pb2 as llm_v2_pb2
from meshserve.llm.v2 import llm_pb2_grpc as llm_v2_pb2_grpc
from services.mesh.local import LocalMesh
from tests.e2e.helpers import MODEL, bearer, create_key, openai_client
from tests.e2e.test_billing import ledger_line

pytestmark = pytest.mark.mesh

ASK = "What is the capital of France?"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def vllm(vllm_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{vllm_url}/v1", api_key="unused", max_retries=0, timeout=120)


def both(mesh: LocalMesh, vllm: openai.OpenAI) -> list[openai.OpenAI]:
    return [openai_client(mesh), vllm]


def test_a_response_gives_vllms_answer(mesh: LocalMesh, vllm: openai.OpenAI) -> None:
    ask: dict[str, Any] = {"model": MODEL, "input": ASK, "max_output_tokens": 12, "temperature": 0, "store": False}
    ours, theirs = [c.responses.create(**ask, instructions="Answer in one word.") for c in both(mesh, vllm)]
    assert ours.output_text == theirs.output_text and "Paris" in ours.output_text
    assert ours.usage is not None and theirs.usage is not None
    assert ours.usage.input_tokens == theirs.usage.input_tokens
    assert ours.usage.output_tokens == theirs.usage.output_tokens
    assert ours.id.startswith("resp_") and ours.object == "response" and ours.store is False


def test_a_streamed_response_has_the_event_sequence_and_the_whole_ones_text(
    mesh: LocalMesh, vllm: openai.OpenAI
) -> None:
    ask: dict[str, Any] = {"model": MODEL, "input": ASK, "max_output_tokens": 10, "temperature": 0, "store": False}
    seen = []
    for c in both(mesh, vllm):
        events = list(c.responses.create(**ask, stream=True))
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        seen.append(([e.type for e in events], text, events[-1]))
    (our_types, our_text, our_last), (their_types, their_text, _) = seen
    assert our_types == their_types and our_types[0] == "response.created" and our_types[-1] == "response.completed"
    assert our_text == their_text == openai_client(mesh).responses.create(**ask).output_text
    assert our_last.response.usage.output_tokens > 0


def test_a_forced_function_call_and_its_output_give_vllms_answers(mesh: LocalMesh, vllm: openai.OpenAI) -> None:
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    ask: dict[str, Any] = {"model": MODEL, "tools": [WEATHER], "temperature": 0, "max_output_tokens": 60}
    forced = {"type": "function", "name": "get_weather"}
    ours, theirs = [c.responses.create(**ask, input=question, tool_choice=forced) for c in both(mesh, vllm)]
    calls = [(o.name, json.loads(o.arguments)) for o in ours.output if o.type == "function_call"]
    assert calls and calls[0][0] == "get_weather"
    assert calls == [(o.name, json.loads(o.arguments)) for o in theirs.output if o.type == "function_call"]
    call = next(o for o in ours.output if o.type == "function_call")
    answered = [*question, call.model_dump(exclude_none=True)]
    answered.append({"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"})
    follow = [c.responses.create(**ask, input=answered) for c in both(mesh, vllm)]  # type: ignore[arg-type]
    assert follow[0].output_text == follow[1].output_text


def test_a_json_schema_text_format_gives_vllms_structured_answer(mesh: LocalMesh, vllm: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    text = {"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}}
    ask: dict[str, Any] = {"model": MODEL, "input": ASK, "text": text, "temperature": 0, "max_output_tokens": 40}
    ours, theirs = [c.responses.create(**ask) for c in both(mesh, vllm)]
    assert ours.output_text == theirs.output_text
    assert set(json.loads(ours.output_text)) == {"city", "country"}


def test_previous_response_id_continues_the_stored_conversation(mesh: LocalMesh, vllm: openai.OpenAI) -> None:
    sdk = openai_client(mesh)
    greedy: dict[str, Any] = {"model": MODEL, "temperature": 0, "max_output_tokens": 12}
    first = sdk.responses.create(**greedy, input=ASK)
    assert first.store is True
    second = sdk.responses.create(**greedy, input="And of Germany?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # What vLLM answers to the same conversation sent whole, as a store: false client sends it.
    whole = [{"role": "user", "content": ASK}, *(o.model_dump(exclude_none=True) for o in first.output)]
    whole.append({"role": "user", "content": "And of Germany?"})
    assert second.output_text == vllm.responses.create(**greedy, input=whole, store=False).output_text  # type: ignore[arg-type]
    # Read back, by the tenant that stored it only.
    assert sdk.responses.retrieve(second.id).output_text == second.output_text
    _, stranger = create_key(mesh, "responses-stranger")
    with pytest.raises(openai.NotFoundError):
        openai_client(mesh, stranger).responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError):
        openai_client(mesh, stranger).responses.create(**greedy, input="Hi", previous_response_id=first.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(**greedy, input="Hi", previous_response_id="resp_unknown")
    unstored = sdk.responses.create(**greedy, input=ASK, store=False)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(unstored.id)


def post(mesh: LocalMesh, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{mesh.edge_url}/v1/responses", json=body, headers=dict(bearer(mesh.user_key)), timeout=60)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"input": []}, "input"),
        ({"input": [7]}, "input[0]"),
        ({"background": True}, "background"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_what_the_contract_forbids_is_a_400_naming_the_field(
    mesh: LocalMesh, change: dict[str, Any], named: str
) -> None:
    r = post(mesh, {"model": MODEL, "input": ASK, "max_output_tokens": 4, **change})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and named in r.json()["error"]["message"]


def test_grpc_clients_get_the_same_json_and_read_stored_responses(mesh: LocalMesh) -> None:
    whole = post(mesh, {"model": MODEL, "input": ASK, "max_output_tokens": 4, "temperature": 0})
    assert whole.status_code == 200, whole.text
    with grpc.insecure_channel(f"{mesh.edge.host}:{mesh.edge.port}") as channel:
        stub = llm_v2_pb2_grpc.LlmServiceStub(channel)
        body = httpbody_pb2.HttpBody(content_type="application/json", data=whole.request.content)
        native = json.loads(stub.CreateResponse(body, metadata=bearer(mesh.user_key), timeout=60).data)
        stored = stub.GetResponse(
            llm_v2_pb2.GetResponseRequest(response_id=whole.json()["id"]), metadata=bearer(mesh.user_key), timeout=10
        )
    assert native["output"][0]["content"][0]["text"] == whole.json()["output"][0]["content"][0]["text"]
    assert json.loads(stored.data)["id"] == whole.json()["id"]


def test_responses_are_billed_as_their_callers_were_told(mesh: LocalMesh) -> None:
    key, secret = create_key(mesh, "responses-billed")
    sdk = openai_client(mesh, secret)
    ask: dict[str, Any] = {"model": MODEL, "input": ASK, "temperature": 0}
    told = [sdk.responses.create(**ask, max_output_tokens=n).usage for n in (3, 5)]
    events = list(sdk.responses.create(**ask, max_output_tokens=4, stream=True))
    told.append(events[-1].response.usage)  # type: ignore[union-attr]
    line = ledger_line(mesh, key.key_id, 3)
    assert line.requests == 3
    assert line.prompt_tokens == sum(u.input_tokens for u in told if u is not None)
    assert line.completion_tokens == sum(u.output_tokens for u in told if u is not None)
