"""The router's completion logic over a fake replica: response shapes, usage, errors in and out of band."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from meshserve.inference.v1 import inference_pb2 as ipb
from meshserve.llm.v1 import llm_pb2
from services.router.caller import Caller
from services.router.catalogue import Catalogue, ModelEntry, Version
from services.router.completions import Completions
from services.runtime.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable

ANY = Caller(tenant="t", key_id="key_1", allowed_models=None)


class FakeReplica:
    """Replays scripted steps, then optionally fails."""

    def __init__(self, steps: list[ipb.GenerateResponse], fail_after: Exception | None = None) -> None:
        self.address = "fake:1"
        self.steps = steps
        self.fail_after = fail_after
        self.requests: list[ipb.GenerateRequest] = []
        self.closed = False

    async def generate(self, request: ipb.GenerateRequest) -> AsyncIterator[ipb.GenerateResponse]:
        self.requests.append(request)
        try:
            for step in self.steps:
                yield step
            if self.fail_after is not None:
                raise self.fail_after
        finally:
            self.closed = True


def steps(*texts: str, finish: int = ipb.FINISH_REASON_STOP) -> list[ipb.GenerateResponse]:
    out = []
    for i, text in enumerate(texts, 1):
        out.append(ipb.GenerateResponse(text=text, token_ids=[i], prompt_tokens=4, completion_tokens=i))
    out[-1].finish_reason = finish  # type: ignore[assignment]
    return out


def completions(replica: FakeReplica) -> Completions:
    catalogue = Catalogue([ModelEntry("m", (Version("v1", 1.0, ("fake:1",)),), 1700000000, "meshserve")])
    return Completions(lambda: catalogue, lambda address: replica, clock=lambda: 1700000123.0)


def chat(**kw: object) -> llm_pb2.ChatCompletionParams:
    return llm_pb2.ChatCompletionParams(
        model="m",
        messages=[
            llm_pb2.ChatMessage(role="system", content="be brief"),
            llm_pb2.ChatMessage(role="user", content="hi"),
        ],
        **kw,  # type: ignore[arg-type]
    )


async def test_chat_joins_the_deltas_and_reports_usage() -> None:
    replica = FakeReplica(steps("Hel", "lo", finish=ipb.FINISH_REASON_LENGTH))
    reply = await completions(replica).chat(chat(max_tokens=2, temperature=0.0), ANY)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.created == 1700000123
    assert reply.choices[0].message.content == "Hello"
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (4, 2, 6)
    sent = replica.requests[0]
    assert [(t.role, t.content) for t in sent.input.conversation.turns] == [("system", "be brief"), ("user", "hi")]
    assert sent.sampling.max_tokens == 2 and sent.sampling.HasField("temperature")
    assert not sent.sampling.HasField("top_p")
    assert sent.request_id == reply.id


async def test_stream_sends_role_first_then_deltas_finish_and_usage() -> None:
    replica = FakeReplica(steps("a", "b"))
    params = chat(stream=True, stream_options=llm_pb2.StreamOptions(include_usage=True))
    chunks = [c async for c in completions(replica).chat_stream(params, ANY)]
    assert [c.choices[0].delta.content for c in chunks[:2]] == ["a", "b"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert not chunks[1].choices[0].delta.HasField("role")
    assert chunks[2].choices[0].finish_reason == "stop" and not chunks[2].choices[0].delta.HasField("content")
    assert not chunks[0].choices[0].HasField("finish_reason")
    assert list(chunks[3].choices) == [] and chunks[3].usage.completion_tokens == 2
    assert len({c.id for c in chunks}) == 1
    assert replica.closed


async def test_stream_without_include_usage_has_no_usage_chunk() -> None:
    chunks = [c async for c in completions(FakeReplica(steps("a"))).chat_stream(chat(stream=True), ANY)]
    assert not any(c.HasField("usage") for c in chunks)


async def test_an_error_after_the_first_token_goes_in_band() -> None:
    replica = FakeReplica(steps("a", finish=ipb.FINISH_REASON_UNSPECIFIED), fail_after=Unavailable("replica died"))
    chunks = [c async for c in completions(replica).chat_stream(chat(stream=True), ANY)]
    assert chunks[0].choices[0].delta.content == "a"
    assert chunks[-1].error.message == "replica died"
    assert chunks[-1].error.type == "server_error" and chunks[-1].error.code == "unavailable"


async def test_an_error_before_the_first_token_is_a_status() -> None:
    replica = FakeReplica([], fail_after=InvalidArgument("messages: too long"))
    with pytest.raises(InvalidArgument):
        [c async for c in completions(replica).chat_stream(chat(stream=True), ANY)]


async def test_an_engine_abort_is_unavailable_not_a_silent_finish() -> None:
    with pytest.raises(Unavailable):
        await completions(FakeReplica(steps("a", finish=ipb.FINISH_REASON_ABORT))).chat(chat(), ANY)


async def test_unknown_model_is_not_found_and_lists_the_known_ones() -> None:
    with pytest.raises(NotFound, match="available models: m"):
        await completions(FakeReplica(steps("a"))).chat(
            llm_pb2.ChatCompletionParams(model="x", messages=[llm_pb2.ChatMessage(role="user", content="hi")]), ANY
        )


async def test_a_key_limited_to_other_models_is_denied_before_any_engine_work() -> None:
    replica = FakeReplica(steps("a"))
    limited = Caller(tenant="t", key_id="key_2", allowed_models=frozenset({"other"}))
    with pytest.raises(PermissionDenied, match="key_2 may not use model 'm'"):
        await completions(replica).chat(chat(), limited)
    with pytest.raises(PermissionDenied):
        [c async for c in completions(replica).chat_stream(chat(stream=True), limited)]
    assert replica.requests == []
    assert list(completions(replica).list_models(limited).data) == []


async def test_text_completion_both_ways() -> None:
    params = llm_pb2.CompletionParams(model="m", prompt="Once", max_tokens=2)
    whole = await completions(FakeReplica(steps("up", "on"))).completion(params, ANY)
    assert whole.object == "text_completion" and whole.choices[0].text == "upon"
    params.stream = True
    chunks = [c async for c in completions(FakeReplica(steps("up", "on"))).completion_stream(params, ANY)]
    assert [c.choices[0].text for c in chunks] == ["up", "on", ""]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_models_come_from_the_catalogue() -> None:
    listed = completions(FakeReplica([])).list_models(ANY)
    assert listed.object == "list"
    assert [(m.id, m.object, m.created, m.owned_by) for m in listed.data] == [("m", "model", 1700000000, "meshserve")]
