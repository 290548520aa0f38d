"""vLLM's sampling extensions in the body, as its own server takes them, through the edge to the real engine."""

from __future__ import annotations

import pytest

from meshserve.llm.v1 import llm_pb2
from services.mesh.local import LocalMesh
from tests.e2e.helpers import MODEL, QUESTION, bearer, edge_stub, openai_client

pytestmark = pytest.mark.mesh

# Log-probabilities closer than this (nats) make a near tie.
NEAR_TIE = 0.1


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
    prompt = "The capital of France is"
    greedy = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
    top1 = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=1.0, logprobs=1, extra_body={"top_k": 1}
    )
    # Only the likeliest token: greedy, at any temperature. Up to the first near tie (the two likeliest within
    # NEAR_TIE nats), where the engine's arithmetic may order them either way from one call to the next (seen
    # on a CPU without AVX-512: " United" against " answer" eight tokens in).
    chosen = greedy.choices[0].logprobs
    assert chosen is not None and chosen.top_logprobs is not None and chosen.tokens is not None
    margins = [abs(a - b) for a, b in (sorted(top.values())[-2:] for top in chosen.top_logprobs)]
    clear = next((i for i, margin in enumerate(margins) if margin < NEAR_TIE), len(margins))
    assert clear >= 2  # " Paris" and what follows it are far from any tie
    sampled = top1.choices[0].logprobs
    assert sampled is not None and sampled.tokens is not None
    assert sampled.tokens[:clear] == chosen.tokens[:clear]
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
