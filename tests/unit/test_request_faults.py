"""A caller's bad request is that caller's error: the engine refuses it by size, the router never ejects for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from services.inference.engine import Engine, EngineConfig, _StatsSink
from services.router.replicas import domain_error
from services.runtime import errors


class CountingTokenizer:
    """A tokenizer whose longest token is 4 bytes; counts how often it was asked to tokenize."""

    def __init__(self) -> None:
        self.calls = 0

    def get_vocab(self) -> dict[str, int]:
        return {"a": 0, "abcd": 1, "é": 2}

    def __call__(self, text: str) -> Any:
        self.calls += 1
        return type("Encoded", (), {"input_ids": list(range(len(text) // 4 + 1))})()

    def apply_chat_template(self, messages: list[dict[str, str]], **kw: Any) -> list[int]:
        self.calls += 1
        return list(range(sum(len(m["content"]) for m in messages) // 4 + 3 * len(messages)))


def engine(tokenizer: CountingTokenizer) -> Engine:
    return Engine(EngineConfig("m", Path("unused"), max_model_len=100), None, tokenizer, _StatsSink())


def test_a_prompt_that_cannot_fit_is_refused_without_tokenizing_it() -> None:
    tok = CountingTokenizer()
    e = engine(tok)
    assert e.max_token_bytes == 4
    with pytest.raises(errors.InvalidArgument, match="cannot fit the model's context of 100 tokens"):
        e.tokenize_text("x" * 401)
    with pytest.raises(errors.InvalidArgument, match="messages"):
        e.tokenize_chat([("user", "x" * 400)])
    with pytest.raises(errors.InvalidArgument, match="messages"):
        e.tokenize_chat([("user", "")] * 101)  # every turn adds a token of the template's own
    assert tok.calls == 0
    assert len(e.tokenize_text("x" * 400)) == 101  # may fit: tokenized, and vLLM's check decides
    assert tok.calls == 1


def test_non_finite_sampling_never_reaches_the_engine() -> None:
    pytest.importorskip("vllm")
    from services.runtime.sampling import Sampling

    for bad in (float("nan"), float("inf")):
        with pytest.raises(errors.InvalidArgument, match="finite"):
            engine(CountingTokenizer())._sampling_params(3, Sampling(temperature=bad))


def rpc_error(code: grpc.StatusCode, details: str = "x") -> aio.AioRpcError:
    return aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), details=details)


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.Unavailable),
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.UNKNOWN, errors.Internal),
        (grpc.StatusCode.INTERNAL, errors.Internal),
    ],
)
def test_only_a_replica_that_is_down_is_an_unavailable_replica(code: grpc.StatusCode, error: type) -> None:
    # The router ejects and fails over on Unavailable alone; the rest are the request's own.
    assert type(domain_error(rpc_error(code), "10.0.0.1:1")) is error


def test_an_engine_error_message_is_bounded() -> None:
    exc = domain_error(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "m" * 100_000), "10.0.0.1:1")
    assert len(str(exc)) <= errors.MAX_MESSAGE_CHARS


def test_echoed_values_and_messages_are_bounded() -> None:
    assert len(errors.echo("r" * 100_000)) == errors.MAX_ECHO_CHARS
    assert len(str(errors.InvalidArgument("x" * 100_000))) == errors.MAX_MESSAGE_CHARS
    assert str(errors.InvalidArgument("short")) == "short"
