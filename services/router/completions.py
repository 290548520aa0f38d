"""Chat and text completions: validate, pick the replica, generate, and shape OpenAI responses."""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Protocol, TypeVar

from meshserve.inference.v1 import inference_pb2
from meshserve.llm.v1 import llm_pb2
from services.router import validation
from services.router.caller import Caller
from services.router.catalogue import Catalogue
from services.router.validation import OPTIONAL_SAMPLING, GenerationSpec
from services.runtime.errors import DomainError, Unavailable

log = logging.getLogger(__name__)

FINISH_REASONS = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
}


class Replica(Protocol):
    """An inference replica, as the router calls it."""

    address: str

    def generate(self, request: inference_pb2.GenerateRequest) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """Streams the engine's steps; raises DomainError for what went wrong. Closing it aborts the generation."""
        ...

    async def count_tokens(self, request: inference_pb2.GenerateRequest) -> tuple[int, int]:
        """(prompt tokens, the model's context length) for a request."""
        ...


class TokenBudget(Protocol):
    """Token limits: reserve before generating, settle with the real counts after."""

    async def reserve(self, request_id: str, caller: Caller, model: str, prompt_tokens: int, max_tokens: int) -> None:
        """Holds the tokens; raises ResourceExhausted when the budget cannot hold them."""
        ...

    def settle(
        self, request_id: str, caller: Caller, model: str, prompt_tokens: int, completion_tokens: int, outcome: str
    ) -> None:
        """Settles in the background (outcome: completed, cancelled or failed); never raises."""
        ...


Chunk = TypeVar("Chunk", llm_pb2.StreamChatCompletionResponse, llm_pb2.StreamCompletionResponse)


def _usage(step: inference_pb2.GenerateResponse) -> llm_pb2.Usage:
    return llm_pb2.Usage(
        prompt_tokens=step.prompt_tokens,
        completion_tokens=step.completion_tokens,
        total_tokens=step.prompt_tokens + step.completion_tokens,
    )


def _finish_reason(step: inference_pb2.GenerateResponse) -> str:
    if step.finish_reason in FINISH_REASONS:
        return FINISH_REASONS[step.finish_reason]
    raise Unavailable("the engine aborted the request")


def _error_detail(exc: BaseException) -> llm_pb2.ErrorDetail:
    if isinstance(exc, DomainError):
        return llm_pb2.ErrorDetail(message=str(exc), type="server_error", code=exc.code)
    return llm_pb2.ErrorDetail(message="internal error while generating", type="server_error", code="internal_error")


class Completions:
    """The public API's logic, over a catalogue and a way to reach replicas."""

    def __init__(
        self,
        catalogue: Callable[[], Catalogue],
        replica: Callable[[str], Replica],
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        budget: TokenBudget | None = None,
    ) -> None:
        self._catalogue = catalogue
        self._replica = replica
        self._budget = budget
        self._clock = clock
        self._rng = rng or random.Random()

    def list_models(self, caller: Caller) -> llm_pb2.ListModelsResponse:
        """The catalogue's models that the caller may use."""
        return llm_pb2.ListModelsResponse(
            object="list",
            data=[
                llm_pb2.Model(id=e.id, object="model", created=e.created, owned_by=e.owned_by)
                for e in self._catalogue().entries()
                if caller.may_use(e.id)
            ],
        )

    async def _generate(
        self, request_id: str, spec: GenerationSpec, caller: Caller
    ) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        # Permission before existence: a key learns nothing about models it may not use.
        caller.require(spec.model)
        entry = self._catalogue().get(spec.model)
        # One address per version: a host:port, or a headless Service that gRPC balances over.
        replica = self._replica(entry.pick(self._rng).replicas[0])
        s = spec.sampling
        sampling = inference_pb2.SamplingParams(stop=s.stop)
        for name in OPTIONAL_SAMPLING:
            value = getattr(s, name)
            if value is not None:
                setattr(sampling, name, value)
        if spec.text is not None:
            model_input = inference_pb2.Input(text=spec.text)
        else:
            model_input = inference_pb2.Input(
                conversation=inference_pb2.Conversation(
                    turns=[inference_pb2.ChatTurn(role=r, content=c) for r, c in spec.turns]
                )
            )
        request = inference_pb2.GenerateRequest(
            request_id=request_id, model=spec.model, input=model_input, sampling=sampling
        )
        # Internal callers (no tenant) have no token budget.
        if self._budget is None or not caller.tenant:
            # aclosing: a consumer that stops early must close the replica's stream (abort on the engine) now.
            async with aclosing(replica.generate(request)) as stream:
                async for step in stream:
                    yield step
            return
        prompt_tokens, context = await replica.count_tokens(request)
        max_tokens = s.max_tokens if s.max_tokens is not None else max(0, context - prompt_tokens)
        await self._budget.reserve(request_id, caller, spec.model, prompt_tokens, max_tokens)
        last: inference_pb2.GenerateResponse | None = None
        outcome = "cancelled"
        try:
            async with aclosing(replica.generate(request)) as stream:
                async for step in stream:
                    last = step
                    if step.finish_reason in FINISH_REASONS:
                        outcome = "completed"
                    yield step
        except Exception:
            outcome = "failed"
            raise
        finally:
            # Runs however the stream ends: finished, failed, or closed early by a client that went away.
            self._budget.settle(
                request_id,
                caller,
                spec.model,
                last.prompt_tokens if last is not None else prompt_tokens,
                last.completion_tokens if last is not None else 0,
                outcome,
            )

    async def _collect(
        self, request_id: str, spec: GenerationSpec, caller: Caller
    ) -> tuple[str, inference_pb2.GenerateResponse]:
        parts = []
        last = inference_pb2.GenerateResponse()
        async with aclosing(self._generate(request_id, spec, caller)) as steps:
            async for step in steps:
                parts.append(step.text)
                last = step
        _finish_reason(last)
        return "".join(parts), last

    async def chat(self, params: llm_pb2.ChatCompletionParams, caller: Caller) -> llm_pb2.CreateChatCompletionResponse:
        """A whole chat reply."""
        spec = validation.chat(params)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        text, last = await self._collect(request_id, spec, caller)
        return llm_pb2.CreateChatCompletionResponse(
            id=request_id,
            object="chat.completion",
            created=int(self._clock()),
            model=spec.model,
            choices=[
                llm_pb2.ChatChoice(
                    index=0,
                    message=llm_pb2.ChatMessage(role="assistant", content=text),
                    finish_reason=_finish_reason(last),
                )
            ],
            usage=_usage(last),
        )

    async def completion(self, params: llm_pb2.CompletionParams, caller: Caller) -> llm_pb2.CreateCompletionResponse:
        """A whole text continuation."""
        spec = validation.completion(params)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        text, last = await self._collect(request_id, spec, caller)
        return llm_pb2.CreateCompletionResponse(
            id=request_id,
            object="text_completion",
            created=int(self._clock()),
            model=spec.model,
            choices=[llm_pb2.CompletionChoice(index=0, text=text, finish_reason=_finish_reason(last))],
            usage=_usage(last),
        )

    def chat_stream(
        self, params: llm_pb2.ChatCompletionParams, caller: Caller
    ) -> AsyncIterator[llm_pb2.StreamChatCompletionResponse]:
        """A chat reply as chunks."""
        spec = validation.chat(params)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(self._clock())
        first = True

        def chunk(
            text: str | None, finish: str | None, usage: llm_pb2.Usage | None, error: llm_pb2.ErrorDetail | None
        ) -> llm_pb2.StreamChatCompletionResponse:
            nonlocal first
            msg = llm_pb2.StreamChatCompletionResponse(
                id=request_id, object="chat.completion.chunk", created=created, model=spec.model
            )
            if text is not None or finish is not None:
                choice = msg.choices.add(index=0)
                choice.delta.SetInParent()
                if first:
                    choice.delta.role = "assistant"
                    first = False
                if text is not None:
                    choice.delta.content = text
                if finish is not None:
                    choice.finish_reason = finish
            if usage is not None:
                msg.usage.CopyFrom(usage)
            if error is not None:
                msg.error.CopyFrom(error)
            return msg

        return self._stream(request_id, spec, caller, chunk)

    def completion_stream(
        self, params: llm_pb2.CompletionParams, caller: Caller
    ) -> AsyncIterator[llm_pb2.StreamCompletionResponse]:
        """A text continuation as chunks."""
        spec = validation.completion(params)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(self._clock())

        def chunk(
            text: str | None, finish: str | None, usage: llm_pb2.Usage | None, error: llm_pb2.ErrorDetail | None
        ) -> llm_pb2.StreamCompletionResponse:
            msg = llm_pb2.StreamCompletionResponse(
                id=request_id, object="text_completion", created=created, model=spec.model
            )
            if text is not None or finish is not None:
                choice = msg.choices.add(index=0, text=text or "")
                if finish is not None:
                    choice.finish_reason = finish
            if usage is not None:
                msg.usage.CopyFrom(usage)
            if error is not None:
                msg.error.CopyFrom(error)
            return msg

        return self._stream(request_id, spec, caller, chunk)

    async def _stream(
        self,
        request_id: str,
        spec: GenerationSpec,
        caller: Caller,
        chunk: Callable[[str | None, str | None, llm_pb2.Usage | None, llm_pb2.ErrorDetail | None], Chunk],
    ) -> AsyncIterator[Chunk]:
        steps = self._generate(request_id, spec, caller)
        # Until the first step arrives an error is still a status code (a 4xx/5xx on REST);
        # after it, the HTTP status is sent and errors go in-band on a chunk.
        step = await anext(steps, None)
        if step is None:
            raise Unavailable("the engine ended the stream before the first token")
        last = step
        try:
            while True:
                last = step
                if step.text:
                    yield chunk(step.text, None, None, None)
                if step.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
                    yield chunk(None, _finish_reason(step), None, None)
                    break
                step = await anext(steps)
        except StopAsyncIteration:
            yield chunk(None, None, None, _error_detail(Unavailable("the engine ended the stream without finishing")))
            return
        except Exception as exc:
            log.warning("stream failed after it began", extra={"request_id": request_id, "error": str(exc)})
            yield chunk(None, None, None, _error_detail(exc))
            return
        finally:
            await steps.aclose()
        if spec.include_usage:
            yield chunk(None, None, _usage(last), None)
