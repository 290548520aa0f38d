"""The official OpenAI SDK, unchanged, against the Envoy edge of the real mesh."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from meshserve.inference.v1 import inference_pb2
from services.mesh.local import LocalMesh
from tests.conftest import EMBEDDING_MODEL
from tests.e2e.helpers import MODEL, QUESTION, engine_stub, openai_client

pytestmark = pytest.mark.mesh


def test_chat_completion_answers_with_exact_usage(mesh: LocalMesh) -> None:
    client = openai_client(mesh)
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    assert reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    # The engine's own count of the templated prompt.
    channel, stub = engine_stub(mesh)
    with channel:
        counted = stub.CountTokens(
            inference_pb2.CountTokensRequest(
                model=MODEL,
                input=inference_pb2.Input(
                    conversation=inference_pb2.Conversation(turns=[inference_pb2.ChatTurn(**QUESTION[0])])
                ),
            )
        )
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == counted.prompt_tokens
    assert 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_arrives_incrementally_with_usage_equal_to_the_engine(mesh: LocalMesh) -> None:
    client = openai_client(mesh)
    arrivals: list[float] = []
    texts: list[str] = []
    usage = None
    finish = None
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
        max_tokens=40,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        delta = chunk.choices[0].delta
        if delta.content:
            texts.append(delta.content)
            arrivals.append(time.monotonic())
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish in ("stop", "length")
    assert len(texts) > 5, "tokens must arrive as separate chunks"
    # Incremental: the first delta reached the client well before the last one was generated.
    assert arrivals[-1] - arrivals[0] > 0.2
    # The same request, unstreamed, gives the same text and the same counts from the engine.
    whole = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
        max_tokens=40,
        temperature=0,
    )
    assert "".join(texts) == whole.choices[0].message.content
    assert usage is not None and whole.usage is not None
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completions_both_ways(mesh: LocalMesh) -> None:
    client = openai_client(mesh)
    whole = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert whole.object == "text_completion"
    assert "Paris" in whole.choices[0].text
    assert whole.usage is not None and whole.usage.completion_tokens <= 8
    parts = [
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    ]
    assert len(parts) > 1
    assert "".join(parts) == whole.choices[0].text


def test_models_list(mesh: LocalMesh) -> None:
    models = openai_client(mesh).models.list()
    # The chat model and the embedding model the mesh serves beside it.
    assert [m.id for m in models.data] == [MODEL, EMBEDDING_MODEL]
    assert {m.object for m in models.data} == {"model"}
    # What the replicas run, as they report it: both unquantized, the KV cache in the model's dtype.
    assert [(m.model_extra or {}).get("quantization") for m in models.data] == ["none", "none"]
    assert [(m.model_extra or {}).get("kv_cache_dtype") for m in models.data] == ["auto", "auto"]


def test_unknown_model_is_not_found(mesh: LocalMesh) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        openai_client(mesh).chat.completions.create(model="no-such-model", messages=QUESTION)
    assert "no-such-model" in info.value.message
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "not_found_error"


def test_unknown_model_streamed_is_not_found_too(mesh: LocalMesh) -> None:
    with pytest.raises(openai.NotFoundError):
        list(openai_client(mesh).chat.completions.create(model="no-such-model", messages=QUESTION, stream=True))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
        ({"messages": QUESTION, "temperature": 2.5}, "temperature"),
        ({"messages": QUESTION, "top_p": 0}, "top_p"),
        ({"messages": QUESTION, "n": 0}, "n"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi " * 3000}]}, "context"),
        ({"messages": QUESTION, "max_tokens": 4000}, "max_tokens"),
    ],
)
def test_invalid_arguments_are_bad_requests_naming_the_field(mesh: LocalMesh, kwargs: dict, field: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        openai_client(mesh).chat.completions.create(model=MODEL, **kwargs)
    assert field in info.value.message
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "invalid_request_error"


def test_malformed_body_is_a_bad_request_with_a_useful_message(mesh: LocalMesh) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        openai_client(mesh).chat.completions.create(model=MODEL, messages=QUESTION, extra_body={"max_tokens": "many"})
    assert "max_tokens" in info.value.message
    raw = httpx.post(
        f"{mesh.edge_url}/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json", "authorization": f"Bearer {mesh.user_key}"},
    )
    assert raw.status_code == 400
    error = raw.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


def test_unknown_path_is_an_openai_shaped_404(mesh: LocalMesh) -> None:
    raw = httpx.get(f"{mesh.edge_url}/v1/embeddings", headers={"authorization": f"Bearer {mesh.user_key}"})
    assert raw.status_code == 404
    assert raw.json()["error"]["type"] == "not_found_error"


def test_temperature_zero_and_a_fixed_seed_repeat_exactly(mesh: LocalMesh) -> None:
    client = openai_client(mesh)
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Write a haiku about the sea."}], "max_tokens": 24}
    greedy = [client.chat.completions.create(**ask, temperature=0).choices[0].message.content for _ in range(2)]
    assert greedy[0] == greedy[1]
    seeded = [
        client.chat.completions.create(**ask, temperature=1.0, seed=1234).choices[0].message.content for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_stop_strings_end_generation(mesh: LocalMesh) -> None:
    reply = openai_client(mesh).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
        max_tokens=60,
        temperature=0,
        stop=["5"],
    )
    text = reply.choices[0].message.content or ""
    assert "5" not in text and "4" in text
    assert reply.choices[0].finish_reason == "stop"
