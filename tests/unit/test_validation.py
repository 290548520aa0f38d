"""Every request rule, checked without a server."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2

from meshserve.llm.v1 import llm_pb2
from services.router import validation
from services.runtime.errors import InvalidArgument


def chat(**kw: object) -> llm_pb2.ChatCompletionParams:
    base: dict[str, object] = {"model": "m", "messages": [llm_pb2.ChatMessage(role="user", content="hi")]}
    base.update(kw)
    return llm_pb2.ChatCompletionParams(**base)  # type: ignore[arg-type]


def test_a_plain_chat_request_keeps_engine_defaults() -> None:
    spec = validation.chat(chat())
    assert spec.turns == (("user", "hi"),)
    assert spec.text is None
    assert spec.sampling.max_tokens is None and spec.sampling.temperature is None and spec.sampling.stop == ()


def test_set_fields_pass_through() -> None:
    stop = struct_pb2.Value(list_value=struct_pb2.ListValue(values=[struct_pb2.Value(string_value="x")]))
    spec = validation.chat(chat(max_tokens=5, temperature=0.0, top_p=0.5, seed=3, stop=stop))
    assert spec.sampling.max_tokens == 5
    assert spec.sampling.temperature == 0.0
    assert spec.sampling.top_p == 0.5
    assert spec.sampling.seed == 3
    assert spec.sampling.stop == ("x",)


def test_max_completion_tokens_is_an_alias() -> None:
    assert validation.chat(chat(max_completion_tokens=7)).sampling.max_tokens == 7


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (chat(model=""), "model"),
        (chat(messages=[]), "messages"),
        (chat(messages=[llm_pb2.ChatMessage(role="tool", content="x")]), "messages[0].role"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_tokens=3, max_completion_tokens=3), "max_tokens"),
        (chat(temperature=-0.1), "temperature"),
        (chat(temperature=2.01), "temperature"),
        (chat(top_p=0.0), "top_p"),
        (chat(top_p=1.5), "top_p"),
        (chat(presence_penalty=3), "presence_penalty"),
        (chat(frequency_penalty=-3), "frequency_penalty"),
        (chat(n=2), "n"),
        (chat(stream_options=llm_pb2.StreamOptions(include_usage=True)), "stream_options"),
        (chat(stop=struct_pb2.Value(number_value=3)), "stop"),
        (chat(stop=struct_pb2.Value(string_value="")), "stop"),
        (
            chat(
                stop=struct_pb2.Value(
                    list_value=struct_pb2.ListValue(values=[struct_pb2.Value(string_value=str(i)) for i in range(5)])
                )
            ),
            "stop",
        ),
    ],
)
def test_invalid_chat_requests_name_the_field(params: llm_pb2.ChatCompletionParams, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validation.chat(params)
    assert str(info.value).startswith(field + ":")


def test_completions_default_to_16_tokens_like_openai() -> None:
    spec = validation.completion(llm_pb2.CompletionParams(model="m", prompt="Once"))
    assert spec.text == "Once" and spec.turns == ()
    assert spec.sampling.max_tokens == 16


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (llm_pb2.CompletionParams(model="m", prompt=""), "prompt"),
        (llm_pb2.CompletionParams(model="m", prompt="x", echo=True), "echo"),
        (llm_pb2.CompletionParams(model="m", prompt="x", suffix="y"), "suffix"),
        (llm_pb2.CompletionParams(model="m", prompt="x", max_tokens=0), "max_tokens"),
    ],
)
def test_invalid_completions_name_the_field(params: llm_pb2.CompletionParams, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validation.completion(params)
    assert str(info.value).startswith(field + ":")


def test_stream_options_are_read_when_streaming() -> None:
    spec = validation.chat(chat(stream=True, stream_options=llm_pb2.StreamOptions(include_usage=True)))
    assert spec.include_usage


def _value(obj: object) -> struct_pb2.Value:
    from google.protobuf import json_format

    value = struct_pb2.Value()
    json_format.ParseDict(obj, value)
    return value


def _struct(obj: dict[str, object]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(obj)
    return s


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (chat(logprobs=True), "logprobs"),
        (chat(top_logprobs=2), "top_logprobs"),
        (chat(tools=_value([{"type": "function", "function": {"name": "f"}}])), "tools"),
        (chat(functions=_value([{"name": "f"}])), "functions"),
        (chat(tool_choice=_value("auto")), "tool_choice"),
        (chat(response_format=_struct({"type": "json_object"})), "response_format"),
        (chat(logit_bias=_struct({"50256": -100})), "logit_bias"),
        (llm_pb2.CompletionParams(model="m", prompt="x", logprobs=1), "logprobs"),
        (llm_pb2.CompletionParams(model="m", prompt="x", best_of=2), "best_of"),
    ],
)
def test_unserved_openai_fields_are_refused_not_ignored(params: object, field: str) -> None:
    check = validation.chat if isinstance(params, llm_pb2.ChatCompletionParams) else validation.completion
    with pytest.raises(InvalidArgument) as info:
        check(params)  # type: ignore[arg-type]
    assert str(info.value).startswith(field + ":")


def test_defaults_of_unserved_fields_are_accepted() -> None:
    validation.chat(
        chat(
            logprobs=False,
            tools=_value([]),
            tool_choice=_value("none"),
            response_format=_struct({"type": "text"}),
        )
    )


@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused_naming_the_field(field: str, bad: float) -> None:
    # NaN compares false with every bound: a range check alone lets it through.
    with pytest.raises(InvalidArgument, match=f"^{field}: must be a finite number"):
        validation.chat(chat(**{field: bad}))
    with pytest.raises(InvalidArgument, match=f"^{field}: must be a finite number"):
        validation.completion(llm_pb2.CompletionParams(model="m", prompt="p", **{field: bad}))


def test_a_huge_role_is_quoted_back_shortened() -> None:
    with pytest.raises(InvalidArgument) as info:
        validation.chat(chat(messages=[llm_pb2.ChatMessage(role="r" * 100_000, content="x")]))
    assert len(str(info.value)) < 200


def test_vllm_sampling_extensions_pass_through() -> None:
    spec = validation.chat(
        chat(
            max_tokens=8,
            top_k=5,
            min_p=0.1,
            repetition_penalty=1.2,
            min_tokens=3,
            ignore_eos=True,
            stop_token_ids=[2, 7],
            skip_special_tokens=False,
            include_stop_str_in_output=True,
        )
    )
    s = spec.sampling
    assert (s.top_k, s.min_tokens, s.ignore_eos, s.stop_token_ids) == (5, 3, True, (2, 7))
    assert (s.skip_special_tokens, s.include_stop_str_in_output) == (False, True)
    assert s.min_p == pytest.approx(0.1) and s.repetition_penalty == pytest.approx(1.2)
    unset = validation.completion(llm_pb2.CompletionParams(model="m", prompt="p")).sampling
    assert unset.top_k is None and unset.ignore_eos is None and unset.stop_token_ids == ()


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": float("nan")}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": 3.0}, "repetition_penalty"),
        ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ],
)
def test_vllm_sampling_extensions_are_checked(kw: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^{field}:"):
        validation.chat(chat(**kw))
