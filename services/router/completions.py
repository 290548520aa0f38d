"""Chat and text completions: validate, pick the replica, generate, and shape OpenAI responses."""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import TypeVar

from meshserve.inference.v1 import inference_pb2
from meshserve.llm.v1 import llm_pb2
from services.router import validation
from services.router.accounting import Metered, TokenBudget, UsageSink
from services.router.admission import Admission
from services.router.balancer import Balancer, LoadReport
from services.router.caller import Caller, RouteHints
from services.router.catalogue import Catalogue, ModelEntry, Version
from services.router.failover import DEFAULT_POLICY, Attempt, Replica, ReplicaDirectory, RoutingPolicy, affinity_key
from services.router.pipeline import Pipeline
from services.router.providers import Providers
from services.router.validation import GenerationSpec
from services.runtime.errors import DomainError, Internal, QuotaExceeded, Unavailable
from services.runtime.genai import CHAT, TEXT_COMPLETION
from services.runtime.openai_errors import error_body
from services.runtime.sampling import OPTIONAL_SAMPLING

log = logging.getLogger(__name__)

NO_HINTS = RouteHints()

FINISH_REASONS = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
}


M = TypeVar("M", llm_pb2.Model, llm_pb2.RetrieveModelResponse)
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
    """An error after a stream began, with the type and code the same error has over HTTP."""
    detail = exc if isinstance(exc, DomainError) else Internal("internal error while generating")
    error = error_body(detail.http_status, str(detail), detail.error_type)["error"]
    return llm_pb2.ErrorDetail(message=str(error["message"]), type=str(error["type"]), code=str(error["code"] or ""))


def _model(entry: ModelEntry, message: type[M], report: LoadReport | None) -> M:
    """The model object, in the list (Model) or alone (RetrieveModelResponse: the same fields), with the
    scheme its replicas report running (report: one of its replicas in rotation, if any)."""
    scheme = {"quantization": report.quantization, "kv_cache_dtype": report.kv_cache_dtype} if report else {}
    return message(id=entry.id, object="model", created=entry.created, owned_by=entry.owned_by, **scheme)


def _engine_request(request_id: str, spec: GenerationSpec) -> inference_pb2.GenerateRequest:
    s = spec.sampling
    sampling = inference_pb2.SamplingParams(stop=s.stop, stop_token_ids=s.stop_token_ids)
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
    return inference_pb2.GenerateRequest(request_id=request_id, model=spec.model, input=model_input, sampling=sampling)


async def _within_allowance(
    request: inference_pb2.GenerateRequest, metered: Metered, most: int
) -> inference_pb2.GenerateRequest:
    """The request, its max_tokens lowered to what its spend budgets can pay for: Generate has no way to ask
    for more as it goes, so its money is held for all it may generate at once, as far as the budgets allow."""
    allowance = metered.allowance
    if allowance.tokens is None or allowance.tokens >= most or allowance.extend is None:
        return request
    allowance.tokens = await allowance.extend(most - allowance.tokens)
    if allowance.tokens is None or allowance.tokens >= most:
        return request
    if allowance.tokens == 0:
        raise QuotaExceeded("spend budget exhausted: no budget has room for a completion token")
    capped = inference_pb2.GenerateRequest()
    capped.CopyFrom(request)
    capped.sampling.max_tokens = allowance.tokens
    allowance.stopped = True
    return capped


class Completions:
    """The public API's logic, over a catalogue and the replicas it names."""

    def __init__(
        self,
        catalogue: Callable[[], Catalogue],
        replicas: ReplicaDirectory,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        budget: TokenBudget | None = None,
        balancer: Balancer | None = None,
        admission: Admission | None = None,
        policy: RoutingPolicy = DEFAULT_POLICY,
        usage: UsageSink | None = None,
        providers: Providers | None = None,
    ) -> None:
        self._catalogue = catalogue
        self._clock = clock
        self.pipeline = Pipeline(
            catalogue,
            replicas,
            budget,
            usage,
            clock,
            rng or random.Random(),
            balancer or Balancer(),
            admission or Admission(queue_size=256, queue_timeout_seconds=30.0),
            policy,
            providers,
        )

    def list_models(self, caller: Caller) -> llm_pb2.ListModelsResponse:
        """The catalogue's models that the caller may use."""
        return llm_pb2.ListModelsResponse(
            object="list",
            data=[
                _model(e, llm_pb2.Model, self.pipeline.report_of(e))
                for e in self._catalogue().entries()
                if caller.may_use(e.id)
            ],
        )

    def retrieve_model(self, model: str, caller: Caller) -> llm_pb2.RetrieveModelResponse:
        """One model the caller may use; as for generation, permission is checked before existence."""
        caller.require(model)
        entry = self._catalogue().get(model)
        return _model(entry, llm_pb2.RetrieveModelResponse, self.pipeline.report_of(entry))

    def unready_models(self) -> list[str]:
        """Models the router must not report ready without: required, and no replica of theirs in rotation."""
        return self.pipeline.unready_models()

    def replicas_changed(self) -> None:
        """Lets queued requests in when replicas come into rotation."""
        self.pipeline.replicas_changed()

    def _generate(
        self, request_id: str, spec: GenerationSpec, caller: Caller, hints: RouteHints, unary: bool = False
    ) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        request = _engine_request(request_id, spec)
        pipeline = self.pipeline

        def attempt(metered: Metered, version: Version) -> Attempt[inference_pb2.GenerateResponse]:
            async def steps(replica: Replica) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
                reserve = pipeline.reserver(request_id, caller, spec.model, metered)
                generate = request
                if reserve is not None:
                    prompt_tokens, context = await replica.count_tokens(request)
                    s = spec.sampling
                    most = s.max_tokens if s.max_tokens is not None else max(0, context - prompt_tokens)
                    await reserve(prompt_tokens, most)
                    generate = await _within_allowance(request, metered, most)
                async with aclosing(replica.generate(generate)) as stream:
                    async for step in stream:
                        yield step

            return steps

        key = affinity_key(spec, hints, self.pipeline.policy.prefix_chars)
        chat = request.input.WhichOneof("kind") == "conversation"
        operation = CHAT if chat else TEXT_COMPLETION
        return pipeline.generate(request_id, spec.model, key, caller, hints, attempt, unary, operation=operation)

    async def _collect(
        self, request_id: str, spec: GenerationSpec, caller: Caller, hints: RouteHints
    ) -> tuple[str, inference_pb2.GenerateResponse]:
        parts = []
        last = inference_pb2.GenerateResponse()
        async with aclosing(self._generate(request_id, spec, caller, hints, unary=True)) as steps:
            async for step in steps:
                parts.append(step.text)
                last = step
        _finish_reason(last)
        return "".join(parts), last

    async def chat(
        self, params: llm_pb2.ChatCompletionParams, caller: Caller, hints: RouteHints = NO_HINTS
    ) -> llm_pb2.CreateChatCompletionResponse:
        """A whole chat reply."""
        spec = validation.chat(params)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        text, last = await self._collect(request_id, spec, caller, hints)
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

    async def completion(
        self, params: llm_pb2.CompletionParams, caller: Caller, hints: RouteHints = NO_HINTS
    ) -> llm_pb2.CreateCompletionResponse:
        """A whole text continuation."""
        spec = validation.completion(params)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        text, last = await self._collect(request_id, spec, caller, hints)
        return llm_pb2.CreateCompletionResponse(
            id=request_id,
            object="text_completion",
            created=int(self._clock()),
            model=spec.model,
            choices=[llm_pb2.CompletionChoice(index=0, text=text, finish_reason=_finish_reason(last))],
            usage=_usage(last),
        )

    def chat_stream(
        self, params: llm_pb2.ChatCompletionParams, caller: Caller, hints: RouteHints = NO_HINTS
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

        return self._stream(request_id, spec, caller, hints, chunk)

    def completion_stream(
        self, params: llm_pb2.CompletionParams, caller: Caller, hints: RouteHints = NO_HINTS
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

        return self._stream(request_id, spec, caller, hints, chunk)

    async def _stream(
        self,
        request_id: str,
        spec: GenerationSpec,
        caller: Caller,
        hints: RouteHints,
        chunk: Callable[[str | None, str | None, llm_pb2.Usage | None, llm_pb2.ErrorDetail | None], Chunk],
    ) -> AsyncIterator[Chunk]:
        steps = self._generate(request_id, spec, caller, hints)
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
