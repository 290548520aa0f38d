"""The meter between vLLM's serving layer and the engine. Imports no gRPC.

vLLM's serving layer calls the engine's generate (and encode, for pooling models) with the prompt it
rendered; the meter counts every prompt and generated token of the request, and holds the engine until the
caller has reserved tokens for the rendered prompt (its go-ahead).
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from services.runtime import genai, tracing
from services.runtime.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)


@dataclass
class Reply:
    """One message for the caller: the body or an SSE event, and the token counts so far."""

    data: bytes = b""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished: bool = False
    measured: bool = False
    max_tokens: int = 0
    failed: bool = False
    # The request has sent what it may and asks for more (a ServeAllowance).
    wants_allowance: bool = False
    # The request was ended at its allowance (no budget had room for more).
    stopped: bool = False


@dataclass
class Exchange:
    """One request between the caller and the engine: its counts, and the gate generation waits at."""

    proceed: asyncio.Event = field(default_factory=asyncio.Event)
    replies: asyncio.Queue[Reply | BaseException | None] = field(default_factory=asyncio.Queue)
    prompt_tokens: int = 0
    max_tokens: int = 0
    completion_tokens: int = 0
    measured: bool = False
    # A go-ahead on condition (the most prompt tokens and generated tokens it covers), until measured.
    covered: tuple[int, int] | None = None
    # What the engine's spans are named and described by (the GenAI conventions).
    operation: str = genai.CHAT
    model: str = ""
    # The most completion tokens (over every choice) the caller has paid for; None: no cap.
    allowance: int | None = None
    allowance_changed: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: bool = False
    # The caller sends nothing more (it half-closed): an allowance used up cannot grow, no go-ahead will come.
    caller_closed: bool = False
    # The start let the request go ahead (proceed, or a go-ahead that covers it): the measured counts ride on
    # its first reply with data instead of a message of their own, until then.
    go_ahead_from_start: bool = False
    unsent_measure: bool = False
    # A go-ahead holds (proceed is also set, without this, to wake a request that will get none).
    released: bool = False

    def reply(self, **fields: Any) -> Reply:
        if self.unsent_measure and fields.get("data"):
            self.unsent_measure = False
            fields |= {"measured": True, "max_tokens": self.max_tokens}
        return Reply(
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens, stopped=self.stopped, **fields
        )

    def unsent(self) -> Reply | None:
        """The measured counts not yet sent (a request ending before its first reply with data), if any."""
        return self.reply(measured=True, max_tokens=self.max_tokens) if self.unsent_measure else None

    def release(self) -> None:
        """Lets the measured request generate."""
        self.released = True
        self.proceed.set()

    def allow(self, completion_tokens: int) -> None:
        """The caller's answer to wants_allowance: the most completion tokens the request may now send."""
        self.allowance = completion_tokens
        self.allowance_changed.set()

    def caller_done(self) -> None:
        self.caller_closed = True
        self.allowance_changed.set()
        self.proceed.set()  # a request waiting for a go-ahead gets none: _measured refuses it

    async def room_for(self, more: int) -> bool:
        """Whether `more` completion tokens may be sent now, asking the caller for more room first where the
        allowance is used up."""
        if self.allowance is None or self.completion_tokens + more <= self.allowance:
            return True
        if self.caller_closed:
            return False
        self.allowance_changed.clear()
        self.replies.put_nowait(self.reply(wants_allowance=True))
        await self.allowance_changed.wait()
        return self.completion_tokens + more <= self.allowance

    def go_ahead(self, prompt_tokens: int = 0, max_tokens: int = 0, allowance: int | None = None) -> None:
        """The caller's go-ahead: whatever is measured (prompt_tokens 0), or only within those counts; capped
        at allowance completion tokens when it says."""
        if allowance is not None:
            self.allowance = allowance
        if prompt_tokens == 0:
            self.release()
            return
        self.covered = (prompt_tokens, max_tokens)
        self.release_if_covered()

    def release_if_covered(self) -> None:
        if self.covered is not None and self.measured:
            prompt_tokens, max_tokens = self.covered
            if self.prompt_tokens <= prompt_tokens and self.max_tokens <= max_tokens:
                self.release()


EXCHANGE: contextvars.ContextVar[Exchange] = contextvars.ContextVar("meshserve_exchange")


def _prompt_len(prompt: Any) -> int:
    ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else getattr(prompt, "prompt_token_ids", None)
    return len(ids) if ids is not None else 0


def _span(exchange: Exchange) -> Any:
    """The engine's span of one call, under the Serve call's: "{operation} {model}" as the conventions name it."""
    attributes = genai.request_attributes(exchange.operation, exchange.model)
    return tracing.start_span(genai.span_name(exchange.operation, exchange.model), attributes)


async def _measured(exchange: Exchange) -> None:
    """Says the request's counts once (every engine call of a request is made before the first is iterated:
    they are whole here), then waits for the caller's go-ahead."""
    if not exchange.measured:
        exchange.measured = True
        exchange.release_if_covered()  # a go-ahead on condition may have come before the measurement
        if exchange.go_ahead_from_start and exchange.released:
            exchange.unsent_measure = True  # on the first reply with data: one message less
        else:
            exchange.replies.put_nowait(exchange.reply(measured=True, max_tokens=exchange.max_tokens))
    await exchange.proceed.wait()
    if not exchange.released:
        raise InvalidArgument(
            "the caller half-closed without a go-ahead that covers the measured request: call again with one"
        )


class MeteredEngine:
    """The engine as vLLM's serving layer sees it: generation metered, and gated on the caller's go-ahead."""

    def __init__(self, llm: Any, on_generate: Callable[[int], None] | None = None) -> None:
        self._llm = llm
        self._on_generate = on_generate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def generate(self, prompt: Any, sampling_params: Any, request_id: str, *args: Any, **kwargs: Any) -> Any:
        exchange = EXCHANGE.get(None)
        if exchange is None:  # a call of vLLM's own (none today): unmetered
            return self._llm.generate(prompt, sampling_params, request_id, *args, **kwargs)
        exchange.prompt_tokens += _prompt_len(prompt)
        exchange.max_tokens += (sampling_params.max_tokens or 0) * max(1, getattr(sampling_params, "n", 1) or 1)
        return self._metered(exchange, prompt, sampling_params, request_id, args, kwargs)

    def encode(self, prompt: Any, pooling_params: Any, request_id: str, *args: Any, **kwargs: Any) -> Any:
        """A pooling model's prompt (an embedding): its tokens counted, held for the go-ahead; nothing generated."""
        outputs = self._llm.encode(prompt, pooling_params, request_id, *args, **kwargs)
        exchange = EXCHANGE.get(None)
        if exchange is None:
            return outputs
        exchange.prompt_tokens += _prompt_len(prompt)
        return self._encoded(exchange, outputs)

    @staticmethod
    async def _encoded(exchange: Exchange, outputs: Any) -> AsyncGenerator[Any, None]:
        await _measured(exchange)
        span = _span(exchange)
        try:
            async for output in outputs:
                yield output
        finally:
            genai.record_usage(span, exchange.prompt_tokens, 0)
            span.end()

    async def _metered(
        self, exchange: Exchange, prompt: Any, params: Any, request_id: str, args: Any, kwargs: Any
    ) -> AsyncGenerator[Any, None]:
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        await _measured(exchange)
        kind = getattr(params, "output_kind", None)
        # A whole reply is asked of the engine step by step, as a stream is, and merged here with vLLM's own
        # RequestOutput.add: the caller then sees every token as it comes (time to first token, gaps
        # between tokens) and vLLM's layer still gets the one final output it asked for.
        whole = kind == RequestOutputKind.FINAL_ONLY
        if whole:
            params = params.clone()
            params.output_kind = RequestOutputKind.DELTA
        delta = whole or kind == RequestOutputKind.DELTA
        seen: dict[int, int] = {}
        merged: Any = None
        finished = False
        if self._on_generate is not None:
            self._on_generate(1)
        span = _span(exchange)
        reasons: dict[int, str] = {}
        try:
            async with aclosing(self._llm.generate(prompt, params, request_id, *args, **kwargs)) as outputs:
                async for output in outputs:
                    if not seen:
                        span.add_event("first_token")
                    counts = {c.index: seen.get(c.index, 0) * delta + len(c.token_ids) for c in output.outputs}
                    if not await exchange.room_for(sum(counts.values()) - sum(seen.get(i, 0) for i in counts)):
                        # No budget pays for these tokens: the request ends before them, as at max_tokens.
                        exchange.stopped = finished = True
                        yield _at_allowance(merged if whole else None, output, reasons, getattr(params, "n", 1))
                        break
                    for choice in output.outputs:
                        if choice.finish_reason:
                            reasons[choice.index] = str(choice.finish_reason)
                        exchange.completion_tokens += counts[choice.index] - seen.get(choice.index, 0)
                        seen[choice.index] = counts[choice.index]
                    finished = bool(output.finished)
                    if not whole:
                        yield output
                        continue
                    exchange.replies.put_nowait(exchange.reply())  # progress: the counts, no data
                    if merged is None:
                        merged = output
                    else:
                        merged.add(output, aggregate=True)
                else:
                    if merged is not None:
                        merged.outputs.sort(key=lambda o: o.index)
                        yield merged
        except EngineDeadError as exc:  # the replica is down, not this request at fault
            raise Unavailable(f"the engine died: {exc}") from exc
        finally:
            completion_tokens = sum(seen.values())
            genai.record_usage(span, _prompt_len(prompt), completion_tokens, (reasons[i] for i in sorted(reasons)))
            span.set_attribute("meshserve.finished", finished)
            span.end()
            if self._on_generate is not None:
                self._on_generate(-1)
            if not finished:
                # AsyncLLM aborts a generation whose iterator closes early; said here, as Engine.generate says it.
                log.info("aborted", extra={"request_id": request_id, "completion_tokens": completion_tokens})


def _at_allowance(merged: Any, output: Any, reasons: dict[int, str], n: int | None) -> Any:
    """The last output of a request ended at its allowance: a whole reply's tokens so far, or a stream's
    closing delta with no tokens; every choice not finished ends with "length"."""
    if merged is not None:
        merged.outputs.sort(key=lambda o: o.index)
        for choice in merged.outputs:
            choice.finish_reason = choice.finish_reason or "length"
        merged.finished = True
        return merged
    ended = copy.copy(output)
    template = output.outputs[0]
    ended.outputs = []
    for index in range(max(1, n or 1)):
        if index in reasons:
            continue
        choice = copy.copy(template)
        choice.index, choice.text, choice.token_ids = index, "", []
        choice.logprobs = [] if template.logprobs is not None else None
        choice.finish_reason, choice.stop_reason = "length", None
        ended.outputs.append(choice)
    ended.finished = True
    return ended
