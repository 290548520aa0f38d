"""vLLM's sampling extensions in the body, as its own server takes them, through the edge to the real engine."""

from __future__ import annotations

import pytest

from meshserve.llm.v1 import llm_pb2
from services.mesh.local import LocalMesh
from tests.e2e.helpers import MODEL, QUESTION, bearer, edge_stub, openai_client

pytestmark = pytest.mark.mesh


def test_ignore_eos_generates_up_to_max_tokens(mesh: LocalMesh) -> None:
    # vLLM's benchmark client sends ignore_eos so every request makes exactly max_tokens.
    client = openai_client(mesh)
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=200, temperature=0)  # type: ignore[arg-type]
    assert plain.choices[0].finish_reason == "stop"  # the model ends on its own before 200 tokens
    forced = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=plain.usage.completion_tokens + 8,  # type: ignore[union-attr]
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert forced.choices[0].finish_reason == "length"
    assert forced.usage.completion_tokens == plain.usage.completion_tokens + 8  # type: ignore[union-attr]


def test_min_tokens_and_top_k_reach_the_engine(mesh: LocalMesh) -> None:
    client = openai_client(mesh)
    greedy = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    top1 = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=1.0, extra_body={"top_k": 1}
    )
    assert top1.choices[0].text == greedy.choices[0].text  # only the likeliest token: greedy, at any temperature
    long = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=60,
        temperature=0,
        extra_body={"min_tokens": 40},
    )
    assert long.usage.completion_tokens >= 40  # type: ignore[union-attr]


def test_a_bad_extension_value_is_a_400_naming_it(mesh: LocalMesh) -> None:
    import openai

    with pytest.raises(openai.BadRequestError, match="top_k"):
        openai_client(mesh).chat.completions.create(
            model=MODEL,
            messages=QUESTION,  # type: ignore[arg-type]
            max_tokens=4,
            # vLLM takes 0 (no top-k) and -1; below that it refuses, and so does the edge.
            extra_body={"top_k": -2},
        )


def test_ignore_eos_over_native_grpc(mesh: LocalMesh) -> None:
    channel, stub = edge_stub(mesh)
    params = llm_pb2.ChatCompletionParams(
        model=MODEL,
        messages=[llm_pb2.ChatMessage(role="user", content="Hi")],
        max_tokens=48,
        temperature=0,
        ignore_eos=True,
    )
    with channel:
        reply = stub.CreateChatCompletion(
            llm_pb2.CreateChatCompletionRequest(params=params), metadata=bearer(mesh.user_key), timeout=120
        )
    assert reply.usage.completion_tokens == 48
    assert reply.choices[0].finish_reason == "length"
