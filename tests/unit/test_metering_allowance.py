"""The meter's allowance: a request capped by its spend budgets asks for more before it sends a token past
what is paid for, and ends at its allowance with finish_reason "length", streamed or whole."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from services.inference.metering import EXCHANGE, Exchange, MeteredEngine, Reply

vllm_sampling = pytest.importorskip("vllm.sampling_params")


@dataclass
class Choice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: Any = None
    logprobs: Any = None


@dataclass
class Output:
    outputs: list[Choice]
    finished: bool = False
    aborted: list[bool] = field(default_factory=list)

    def add(self, other: Output, aggregate: bool) -> None:
        for theirs in other.outputs:
            mine = next(c for c in self.outputs if c.index == theirs.index)
            mine.text += theirs.text
            mine.token_ids += theirs.token_ids
            mine.finish_reason = theirs.finish_reason
        self.finished = other.finished


class FakeLLM:
    """Generates `tokens` one-token deltas ("t0", "t1", ...) for one choice; records an early close (abort)."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.closed_early = False

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[Output]:
        try:
            for i in range(self.tokens):
                last = i == self.tokens - 1
                yield Output([Choice(0, f"t{i}", [i], "stop" if last else None)], finished=last)
        except GeneratorExit:
            self.closed_early = True
            raise


async def run(
    tokens: int, allowance: int | None, grants: list[int], whole: bool
) -> tuple[list[Output], list[Reply], FakeLLM]:
    """Generates through the meter, answering each wants_allowance with the next grant."""
    kind = vllm_sampling.RequestOutputKind.FINAL_ONLY if whole else vllm_sampling.RequestOutputKind.DELTA
    params = vllm_sampling.SamplingParams(max_tokens=tokens, output_kind=kind)
    llm = FakeLLM(tokens)
    exchange = Exchange()
    exchange.go_ahead(allowance=allowance)
    replies: list[Reply] = []

    async def caller() -> None:
        while True:
            reply = await exchange.replies.get()
            assert isinstance(reply, Reply)
            replies.append(reply)
            if reply.wants_allowance:
                exchange.allow(grants.pop(0) if grants else exchange.allowance or 0)

    answering = asyncio.create_task(caller())
    EXCHANGE.set(exchange)
    outputs = [o async for o in MeteredEngine(llm).generate({"prompt_token_ids": [1, 2]}, params, "r")]
    await asyncio.sleep(0)
    answering.cancel()
    return outputs, replies, llm


async def test_a_stream_goes_on_while_its_budgets_grant_more_and_ends_at_its_allowance() -> None:
    outputs, replies, llm = await run(20, allowance=3, grants=[6, 6], whole=False)
    texts = [c.text for o in outputs for c in o.outputs]
    assert texts == [f"t{i}" for i in range(6)] + [""]  # six paid for, then the closing delta
    last = outputs[-1]
    assert last.finished and last.outputs[0].finish_reason == "length" and last.outputs[0].token_ids == []
    assert [r.completion_tokens for r in replies if r.wants_allowance] == [3, 6]
    assert llm.closed_early  # the engine's generation is aborted
    assert outputs and all(r.stopped for r in replies if not r.measured and not r.wants_allowance)


async def test_a_whole_reply_keeps_the_tokens_paid_for() -> None:
    outputs, _, llm = await run(20, allowance=4, grants=[], whole=True)
    (merged,) = outputs
    assert merged.outputs[0].text == "t0t1t2t3" and merged.outputs[0].finish_reason == "length"
    assert merged.finished and llm.closed_early


async def test_an_uncapped_or_covered_request_never_asks() -> None:
    outputs, replies, llm = await run(5, allowance=None, grants=[], whole=False)
    assert len(outputs) == 5 and outputs[-1].outputs[0].finish_reason == "stop"
    assert not any(r.wants_allowance for r in replies) and not llm.closed_early
    outputs, replies, _ = await run(5, allowance=5, grants=[], whole=False)
    assert outputs[-1].outputs[0].finish_reason == "stop" and not any(r.wants_allowance for r in replies)


async def test_a_caller_that_stopped_writing_cannot_grant_more() -> None:
    exchange = Exchange()
    exchange.go_ahead(allowance=1)
    exchange.completion_tokens = 1
    exchange.caller_done()
    assert not await asyncio.wait_for(exchange.room_for(1), 1)
