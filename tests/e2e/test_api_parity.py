"""The whole chat and completions API through the edge, side by side with vLLM's own OpenAI server.

Both serve the same model folder with the same engine settings and serving flags; at temperature 0 they
must give the same answers. Where vLLM breaks OpenAI's contract (a named or required tool choice whose
arguments do not match the tool's parameters; unknown fields ignored), the test asserts the contract.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import openai
import pydantic
import pytest
from google.api import httpbody_pb2

from meshserve.llm.v2 import llm_pb2_grpc as llm_v2_pb2_grpc
from services.mesh.local import LocalMesh
from tests.e2e.helpers import MODEL, create_key, openai_client
from tests.e2e.test_billing import ledger_line

pytestmark = pytest.mark.mesh

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]


@pytest.fixture(scope="module")
def vllm(vllm_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{vllm_url}/v1", api_key="unused", max_retries=0)


def both(mesh: LocalMesh, vllm: openai.OpenAI) -> list[openai.OpenAI]:
    return [openai_client(mesh), vllm]


def test_content_parts_and_roles_give_vllms_answer(mesh: LocalMesh, vllm: openai.OpenAI) -> None:
    messages = [{"role": "developer", "content": "Answer in one word."}, *ASK]
    replies = [
        c.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        for c in both(mesh, vllm)
    ]
    ours, theirs = replies
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert ours.choices[0].finish_reason == theirs.choices[0].finish_reason
    assert ours.usage == theirs.usage


def test_logprobs_and_n_give_vllms_answer(mesh: LocalMesh, vllm: openai.OpenAI) -> None:
    ask = {"model": MODEL, "messages": ASK, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    ours, theirs = [c.chat.completions.create(**ask) for c in both(mesh, vllm)]
    mine, other = ours.choices[0].logprobs.content, theirs.choices[0].logprobs.content
    assert [t.token for t in mine] == [t.token for t in other]
    assert all(abs(a.logprob - b.logprob) < 1e-3 for a, b in zip(mine, other, strict=True))
    assert all(len(t.top_logprobs) == 2 for t in mine)
    sampled = openai_client(mesh).chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=6, temperature=1.0, seed=7, n=3
    )
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert 3 <= sampled.usage.completion_tokens <= 18


def test_prompt_lists_and_echo_on_completions_give_vllms_answer(mesh: LocalMesh, vllm: openai.OpenAI) -> None:
    ask = {"model": MODEL, "prompt": ["The sky is", "Water is"], "max_tokens": 5, "temperature": 0, "logprobs": 1}
    ours, theirs = [c.completions.create(**ask) for c in both(mesh, vllm)]
    assert [c.text for c in ours.choices] == [c.text for c in theirs.choices]
    assert [c.index for c in ours.choices] == [0, 1]
    assert ours.usage == theirs.usage
    echoed = openai_client(mesh).completions.create(model=MODEL, prompt="The sky is", max_tokens=3, echo=True)
    assert echoed.choices[0].text.startswith("The sky is")


def test_structured_output_parses_into_a_pydantic_model(mesh: LocalMesh, vllm: openai.OpenAI) -> None:
    class City(pydantic.BaseModel):
        city: str

    ask = {"model": MODEL, "messages": ASK, "max_tokens": 30, "temperature": 0, "response_format": City}
    ours, theirs = [c.chat.completions.parse(**ask) for c in both(mesh, vllm)]
    assert isinstance(ours.choices[0].message.parsed, City)
    assert ours.choices[0].message.content == theirs.choices[0].message.content


WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def arguments_of(reply: object) -> list[tuple[str, dict[str, object]]]:
    calls = reply.choices[0].message.tool_calls or []  # type: ignore[attr-defined]
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_keep_to_the_tools_parameters(mesh: LocalMesh, vllm: openai.OpenAI, choice: object) -> None:
    # The contract: arguments are a JSON object matching the tool's parameters. vLLM's server does that with
    # the replicas' serving flags (--tool-strict-level parameter); with its default it answered "\"Paris\"".
    ask = {"model": MODEL, "messages": WEATHER_QUESTION, "tools": [WEATHER], "tool_choice": choice}
    ours, theirs = [c.chat.completions.create(**ask, max_tokens=60, temperature=0) for c in both(mesh, vllm)]
    calls = arguments_of(ours)
    assert calls and all(name == "get_weather" and isinstance(args.get("city"), str) for name, args in calls)
    assert calls == arguments_of(theirs)
    assert ours.choices[0].finish_reason == theirs.choices[0].finish_reason


def test_auto_tool_choice_and_a_tool_result_turn_give_vllms_answer(mesh: LocalMesh, vllm: openai.OpenAI) -> None:
    ask = {"model": MODEL, "messages": WEATHER_QUESTION, "tools": [WEATHER], "tool_choice": "auto"}
    ours, theirs = [c.chat.completions.create(**ask, max_tokens=60, temperature=0) for c in both(mesh, vllm)]
    assert arguments_of(ours) == arguments_of(theirs)
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert ours.choices[0].finish_reason == theirs.choices[0].finish_reason
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    turns = [
        *WEATHER_QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ]
    ours, theirs = [
        c.chat.completions.create(model=MODEL, messages=turns, tools=[WEATHER], max_tokens=20, temperature=0)
        for c in both(mesh, vllm)
    ]
    assert ours.choices[0].message.content == theirs.choices[0].message.content


def streamed(client: openai.OpenAI, **ask: object) -> object:
    with client.chat.completions.stream(**ask) as stream:  # type: ignore[arg-type]
        return stream.get_final_completion()


def test_streamed_tool_calls_accumulate_as_the_sdk_does(mesh: LocalMesh, vllm: openai.OpenAI) -> None:
    ask = {
        "model": MODEL,
        "messages": WEATHER_QUESTION,
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 60,
        "temperature": 0,
    }
    ours, theirs = [streamed(c, **ask) for c in both(mesh, vllm)]
    calls = arguments_of(ours)
    assert calls and calls[0][0] == "get_weather" and isinstance(calls[0][1].get("city"), str)
    assert calls == arguments_of(theirs)


def test_streamed_text_and_usage_give_vllms_answer(mesh: LocalMesh, vllm: openai.OpenAI) -> None:
    ask = {"model": MODEL, "messages": ASK, "max_tokens": 12, "temperature": 0, "stream": True}
    results = []
    for client in both(mesh, vllm):
        chunks = list(client.chat.completions.create(**ask, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        results.append((text, chunks[-1].usage))
    assert results[0] == results[1]


def test_streams_end_with_done_and_unknown_fields_are_refused(mesh: LocalMesh) -> None:
    headers = {"authorization": f"Bearer {mesh.user_key}"}
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{mesh.edge_url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        events = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    refused = httpx.post(
        f"{mesh.edge_url}/v1/chat/completions", json={**body, "stream": False, "colour": "blue"}, headers=headers
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "Unrecognized request argument supplied: 'colour'"
    noop = httpx.post(
        f"{mesh.edge_url}/v1/chat/completions", json={**body, "stream": False, "store": False}, headers=headers
    )
    assert noop.status_code == 200, noop.text


@pytest.mark.parametrize(
    ("backend", "endpoint"), [("openai-chat", "/v1/chat/completions"), ("openai", "/v1/completions")]
)
def test_vllms_benchmark_client_runs_unpatched_against_the_edge(
    mesh: LocalMesh, model_dir: Path, backend: str, endpoint: str
) -> None:
    args = [
        *("--backend", backend, "--base-url", mesh.edge_url, "--endpoint", endpoint),
        *("--model", MODEL, "--tokenizer", str(model_dir), "--dataset-name", "random"),
        *("--random-input-len", "32", "--random-output-len", "8", "--num-prompts", "6", "--max-concurrency", "3"),
        *("--seed", "1", "--disable-tqdm"),
    ]
    env = {**os.environ, "OPENAI_API_KEY": mesh.user_key, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "bench.vllm_bench", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        timeout=300,
        check=False,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["completed"] == 6 and result["failed"] == 0, result


def test_the_same_features_over_native_grpc_through_the_stubs(mesh: LocalMesh) -> None:
    auth = (("authorization", f"Bearer {mesh.user_key}"),)
    ask = {
        "model": MODEL,
        "messages": WEATHER_QUESTION,
        "tools": [WEATHER],
        "tool_choice": "required",
        "max_tokens": 60,
        "temperature": 0,
    }

    def body(**extra: object) -> httpbody_pb2.HttpBody:
        return httpbody_pb2.HttpBody(content_type="application/json", data=json.dumps({**ask, **extra}).encode())

    with grpc.insecure_channel(f"{mesh.edge.host}:{mesh.edge.port}") as channel:
        stub = llm_v2_pb2_grpc.LlmServiceStub(channel)
        whole = json.loads(stub.CreateChatCompletion(body(), metadata=auth, timeout=120).data)
        events = [m.data for m in stub.StreamChatCompletion(body(), metadata=auth, timeout=120)]
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateChatCompletion(body(colour="blue"), metadata=auth, timeout=30)
    call = whole["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and isinstance(json.loads(call["arguments"]).get("city"), str)
    # The stream's events, as REST clients get them, ending with [DONE]; its tool-call deltas add up to the same.
    assert events[-1] == b"data: [DONE]\n\n"
    deltas = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    streamed = "".join(
        tc["function"].get("arguments") or ""
        for d in deltas
        for c in d["choices"]
        for tc in (c["delta"].get("tool_calls") or [])
    )
    assert json.loads(streamed) == json.loads(call["arguments"])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "colour" in (refused.value.details() or "")


def test_an_image_part_for_a_text_only_model_is_a_clear_400_like_vllms(mesh: LocalMesh, vllm: openai.OpenAI) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
    errors = []
    for client in both(mesh, vllm):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)  # type: ignore[arg-type]
        errors.append(info.value)
    ours = errors[0]
    assert isinstance(ours.body, dict) and ours.body["type"] == "invalid_request_error" and ours.message


def test_usage_of_n_choices_prompt_lists_and_tool_calls_is_what_billing_records(mesh: LocalMesh) -> None:
    key, secret = create_key(mesh, "usage-forms")
    client = openai_client(mesh, secret)
    replies = [
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=1.0, seed=3, n=3),
        client.completions.create(model=MODEL, prompt=["The sky is", "Water is", "Fire is"], max_tokens=4),
        client.chat.completions.create(
            model=MODEL, messages=WEATHER_QUESTION, tools=[WEATHER], tool_choice="required", max_tokens=40
        ),
    ]
    told_prompt = sum(r.usage.prompt_tokens for r in replies if r.usage)
    told_completion = sum(r.usage.completion_tokens for r in replies if r.usage)
    assert told_completion > 3 * 1 + 3 * 1  # every choice and every prompt counted
    line = ledger_line(mesh, key.key_id, len(replies))
    assert (line.requests, line.prompt_tokens, line.completion_tokens) == (3, told_prompt, told_completion)
