"""Checks an OpenAI-shaped request and turns it into a generation spec; every rule is here, once."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf import struct_pb2

from meshserve.llm.v1 import llm_pb2
from services.runtime.errors import InvalidArgument, echo
from services.runtime.sampling import Sampling

ROLES = ("system", "user", "assistant")
MAX_STOP = 4


# The vLLM extensions among them that need no rule beyond their type.
PASSED_AS_SET = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")


@dataclass(frozen=True)
class GenerationSpec:
    """A validated request: which model, what input, how to sample, how to stream."""

    model: str
    # Exactly one of text and turns is set.
    text: str | None
    turns: tuple[tuple[str, str], ...]
    sampling: Sampling
    include_usage: bool


class _Common(Protocol):
    """The fields chat and text completion bodies share."""

    model: str
    max_tokens: int
    temperature: float
    top_p: float
    stop: struct_pb2.Value
    seed: int
    presence_penalty: float
    frequency_penalty: float
    n: int
    stream: bool
    stream_options: llm_pb2.StreamOptions
    top_k: int
    min_p: float
    repetition_penalty: float
    min_tokens: int

    @property
    def stop_token_ids(self) -> Sequence[int]: ...

    def HasField(self, name: str) -> bool: ...


def _optional(params: _Common, name: str) -> float | None:
    value: float | None = getattr(params, name) if params.HasField(name) else None
    return value


def finite(value: Any, where: str = "") -> None:
    """Refuses NaN and the infinities anywhere in a JSON value (Python's json module reads them)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"{where}: must be a finite number, got {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            finite(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            finite(item, f"{where}[{i}]")


def number(fields: dict[str, Any], name: str) -> float | None:
    """A JSON body's numeric field, None where absent or null."""
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name}: must be a number, got {echo(value)}")
    return float(value)


def in_range(name: str, value: float | None, low: float, high: float, low_open: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value):
        # NaN compares false with every bound, so it would pass the range check below.
        raise InvalidArgument(f"{name}: must be a finite number, got {value}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise InvalidArgument(f"{name}: {value:g} is out of range; it must be in {bracket}{low:g}, {high:g}]")


def _stop(value: struct_pb2.Value) -> tuple[str, ...]:
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return ()
    if kind == "string_value":
        strings: Sequence[object] = [value.string_value]
    elif kind == "list_value":
        strings = [v.string_value if v.WhichOneof("kind") == "string_value" else v for v in value.list_value.values]
    else:
        raise InvalidArgument("stop: must be a string or a list of strings")
    if len(strings) > MAX_STOP:
        raise InvalidArgument(f"stop: at most {MAX_STOP} stop strings, got {len(strings)}")
    out = []
    for s in strings:
        if not isinstance(s, str):
            raise InvalidArgument("stop: must be a string or a list of strings")
        if not s:
            raise InvalidArgument("stop: stop strings must not be empty")
        out.append(s)
    return tuple(out)


def _common(params: _Common, max_tokens: int | None) -> tuple[str, Sampling, bool]:
    if not params.model:
        raise InvalidArgument("model: is required")
    if max_tokens is not None and max_tokens < 1:
        raise InvalidArgument(f"max_tokens: must be at least 1, got {max_tokens}")
    n = _optional(params, "n")
    if n is not None and n != 1:
        raise InvalidArgument(f"n: only 1 choice per request is served, got {n:g}")
    temperature = _optional(params, "temperature")
    top_p = _optional(params, "top_p")
    presence = _optional(params, "presence_penalty")
    frequency = _optional(params, "frequency_penalty")
    in_range("temperature", temperature, 0.0, 2.0)
    in_range("top_p", top_p, 0.0, 1.0, low_open=True)
    in_range("presence_penalty", presence, -2.0, 2.0)
    in_range("frequency_penalty", frequency, -2.0, 2.0)
    top_k = params.top_k if params.HasField("top_k") else None
    if top_k is not None and top_k < 1 and top_k != -1:
        raise InvalidArgument(f"top_k: must be -1 (all tokens) or at least 1, got {top_k}")
    min_p = _optional(params, "min_p")
    repetition = _optional(params, "repetition_penalty")
    in_range("min_p", min_p, 0.0, 1.0)
    in_range("repetition_penalty", repetition, 0.0, 2.0, low_open=True)
    min_tokens = params.min_tokens if params.HasField("min_tokens") else None
    if min_tokens is not None and max_tokens is not None and min_tokens > max_tokens:
        raise InvalidArgument(f"min_tokens: {min_tokens} is more than max_tokens {max_tokens}")
    if params.HasField("stream_options") and not params.stream:
        raise InvalidArgument("stream_options: only allowed when stream is true")
    seed = params.seed if params.HasField("seed") else None
    sampling = Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=_stop(params.stop),
        seed=seed,
        presence_penalty=presence,
        frequency_penalty=frequency,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition,
        min_tokens=min_tokens,
        stop_token_ids=tuple(params.stop_token_ids),
        **{name: getattr(params, name) if params.HasField(name) else None for name in PASSED_AS_SET},
    )
    return params.model, sampling, params.stream_options.include_usage


def _is_empty(value: struct_pb2.Value) -> bool:
    kind = value.WhichOneof("kind")
    return (
        kind is None
        or kind == "null_value"
        or (kind == "list_value" and not value.list_value.values)
        or (kind == "struct_value" and not value.struct_value.fields)
    )


def _refuse_unserved_chat_fields(params: llm_pb2.ChatCompletionParams) -> None:
    """OpenAI fields meshserve does not serve: refused when set to anything but their default, never ignored."""
    if params.HasField("logprobs") and params.logprobs:
        raise InvalidArgument("logprobs: log probabilities are not supported")
    if params.HasField("top_logprobs"):
        raise InvalidArgument("top_logprobs: log probabilities are not supported")
    for name in ("tools", "functions"):
        if not _is_empty(getattr(params, name)):
            raise InvalidArgument(f"{name}: tool and function calling are not supported")
    choice = params.tool_choice
    if not _is_empty(choice) and not (choice.WhichOneof("kind") == "string_value" and choice.string_value == "none"):
        raise InvalidArgument("tool_choice: tool calling is not supported")
    fmt = params.response_format.fields
    if fmt and not (set(fmt) == {"type"} and fmt["type"].string_value == "text"):
        raise InvalidArgument('response_format: only {"type": "text"} is supported')
    if params.logit_bias.fields:
        raise InvalidArgument("logit_bias: is not supported")


def chat(params: llm_pb2.ChatCompletionParams) -> GenerationSpec:
    """Validates a chat completion body."""
    _refuse_unserved_chat_fields(params)
    if params.HasField("max_tokens") and params.HasField("max_completion_tokens"):
        raise InvalidArgument("max_tokens: set either max_tokens or max_completion_tokens, not both")
    max_tokens: int | None = None
    if params.HasField("max_tokens"):
        max_tokens = params.max_tokens
    elif params.HasField("max_completion_tokens"):
        max_tokens = params.max_completion_tokens
    model, sampling, include_usage = _common(params, max_tokens)
    if not params.messages:
        raise InvalidArgument("messages: must contain at least one message")
    turns = []
    for i, message in enumerate(params.messages):
        if message.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role: must be one of {', '.join(ROLES)}, got {echo(message.role)}")
        turns.append((message.role, message.content))
    return GenerationSpec(model, None, tuple(turns), sampling, include_usage)


def completion(params: llm_pb2.CompletionParams) -> GenerationSpec:
    """Validates a text completion body."""
    # OpenAI's legacy completions default to 16 tokens, not to the rest of the context.
    max_tokens = params.max_tokens if params.HasField("max_tokens") else 16
    model, sampling, include_usage = _common(params, max_tokens)
    if not params.prompt:
        raise InvalidArgument("prompt: must not be empty")
    if params.echo:
        raise InvalidArgument("echo: is not supported")
    if params.suffix:
        raise InvalidArgument("suffix: is not supported")
    if params.HasField("logprobs"):
        raise InvalidArgument("logprobs: log probabilities are not supported")
    if params.logit_bias.fields:
        raise InvalidArgument("logit_bias: is not supported")
    if params.HasField("best_of") and params.best_of != 1:
        raise InvalidArgument("best_of: only 1 is supported")
    return GenerationSpec(model, params.prompt, (), sampling, include_usage)
