"""The inference servicer: protobuf in, engine calls, protobuf out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from grpc import aio

from meshserve.inference.v1 import inference_pb2, inference_pb2_grpc
from services.inference.engine import Engine, Load
from services.inference.metering import Exchange, Reply
from services.inference.openai_serving import OPERATIONS, Endpoint, ServingLayer
from services.inference.schemes import Scheme
from services.runtime.errors import DomainError, FailedPrecondition, InvalidArgument, NotFound, echo
from services.runtime.interceptors import status_of
from services.runtime.sampling import OPTIONAL_SAMPLING, Sampling

Context = aio.ServicerContext[Any, Any]

# After an in-band error, how long a Serve call waits for its caller to end it.
CALLER_ENDS_SECONDS = 10.0

FINISH = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "abort": inference_pb2.FINISH_REASON_ABORT,
}


ENDPOINTS = {
    inference_pb2.ENDPOINT_CHAT_COMPLETIONS: Endpoint.CHAT,
    inference_pb2.ENDPOINT_COMPLETIONS: Endpoint.COMPLETIONS,
    inference_pb2.ENDPOINT_MESSAGES: Endpoint.MESSAGES,
    inference_pb2.ENDPOINT_RESPONSES: Endpoint.RESPONSES,
    inference_pb2.ENDPOINT_EMBEDDINGS: Endpoint.EMBEDDINGS,
}


def _serve_response(reply: Reply) -> inference_pb2.ServeResponse:
    return inference_pb2.ServeResponse(
        data=reply.data,
        prompt_tokens=reply.prompt_tokens,
        completion_tokens=reply.completion_tokens,
        finish_reason=inference_pb2.FINISH_REASON_STOP if reply.finished else inference_pb2.FINISH_REASON_UNSPECIFIED,
        measured=reply.measured,
        max_tokens=reply.max_tokens,
        failed=reply.failed,
        wants_allowance=reply.wants_allowance,
        stopped_at_allowance=reply.stopped,
    )


async def _follow(requests: AsyncIterator[inference_pb2.ServeRequest], exchange: Exchange) -> None:
    """The caller's go-aheads and allowances, until it half-closes or the call ends (the router does not
    half-close: this is cancelled once the last reply is sent)."""
    async for message in requests:
        if message.HasField("proceed"):
            proceed = message.proceed
            allowance = proceed.allowance_tokens if proceed.capped else None
            exchange.go_ahead(proceed.prompt_tokens, proceed.max_tokens, allowance)
        elif message.HasField("allowance"):
            exchange.allow(message.allowance.completion_tokens)
    exchange.caller_done()


def _load_reply(load: Load, identity: inference_pb2.GetLoadResponse) -> inference_pb2.GetLoadResponse:
    reply = inference_pb2.GetLoadResponse(**asdict(load))
    reply.MergeFrom(identity)
    return reply


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """meshserve.inference.v1.InferenceService over one Engine."""

    def __init__(self, draining: asyncio.Event | None = None, pool: str = "", scheme: Scheme | None = None) -> None:
        self.engine: Engine | None = None
        scheme = scheme or Scheme()
        # What every load report says about the replica besides its load.
        self._identity = inference_pb2.GetLoadResponse(
            pool=pool, quantization=scheme.quantization, kv_cache_dtype=scheme.kv_cache_dtype
        )
        self.serving: ServingLayer | None = None
        # Load streams end when the replica starts draining: routers take it out of rotation at once.
        self._draining = draining or asyncio.Event()

    def _engine(self, model: str | None = None) -> Engine:
        if self.engine is None:
            raise FailedPrecondition("the model is still loading")
        if model is not None and model != self.engine.config.model_name:
            raise NotFound(f"this replica serves {self.engine.config.model_name!r}, not {echo(model)}")
        return self.engine

    def _prompt_ids(self, engine: Engine, model_input: inference_pb2.Input) -> list[int]:
        kind = model_input.WhichOneof("kind")
        if kind == "text":
            return engine.tokenize_text(model_input.text)
        if kind == "conversation":
            return engine.tokenize_chat([(t.role, t.content) for t in model_input.conversation.turns])
        raise InvalidArgument("input: set text or conversation")

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        engine = self._engine(request.model)
        if not request.request_id:
            raise InvalidArgument("request_id: is required")
        s = request.sampling
        sampling = Sampling(
            stop=tuple(s.stop),
            stop_token_ids=tuple(s.stop_token_ids),
            **{name: getattr(s, name) for name in OPTIONAL_SAMPLING if s.HasField(name)},
        )
        prompt_ids = self._prompt_ids(engine, request.input)
        async for step in engine.generate(request.request_id, prompt_ids, sampling):
            yield inference_pb2.GenerateResponse(
                text=step.text,
                token_ids=step.token_ids,
                prompt_tokens=step.prompt_tokens,
                completion_tokens=step.completion_tokens,
                finish_reason=FINISH.get(step.finish_reason or "", inference_pb2.FINISH_REASON_UNSPECIFIED),
            )

    async def Serve(
        self, requests: AsyncIterator[inference_pb2.ServeRequest], context: Context
    ) -> AsyncIterator[inference_pb2.ServeResponse]:
        first = await anext(aiter(requests), None)
        if first is None or not first.HasField("start"):
            raise InvalidArgument("start: the first message must be a ServeStart")
        exchange = Exchange()
        followed = asyncio.create_task(_follow(requests, exchange))
        served: asyncio.Task[None] | None = None
        try:
            try:
                served = asyncio.create_task(self._serve(first.start, exchange))
                while (reply := await exchange.replies.get()) is not None:
                    if isinstance(reply, BaseException):
                        if (measure := exchange.unsent()) is not None:
                            yield _serve_response(measure)  # what the caller settles by, before why it failed
                        raise reply
                    yield _serve_response(reply)
            except DomainError as exc:
                # In-band, then the caller ends the call: see ServeResponse.error in the contract.
                code = status_of(exc)
                context.set_code(code)
                context.set_details(str(exc))
                yield inference_pb2.ServeResponse(error=inference_pb2.ServeError(code=code.value[0], message=str(exc)))
                await asyncio.wait({followed}, timeout=CALLER_ENDS_SECONDS)
        finally:
            # A caller gone (or done) cancels the generation: vLLM's generator closes and aborts it in the engine.
            tasks = [t for t in (served, followed) if t is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, start: inference_pb2.ServeStart, exchange: Exchange) -> None:
        """Serves the request into exchange.replies, a refusal included."""
        try:
            self._engine(start.model)
            if self.serving is None:
                raise FailedPrecondition("the model is still loading")
            if start.endpoint not in ENDPOINTS:
                raise InvalidArgument("endpoint: is required")
            if not start.request_id:
                raise InvalidArgument("request_id: is required")
        except DomainError as exc:
            exchange.replies.put_nowait(exc)
            return
        if start.proceed:
            exchange.release()
        elif start.HasField("go_ahead"):
            go = start.go_ahead
            exchange.go_ahead(go.prompt_tokens, go.max_tokens, go.allowance_tokens if go.capped else None)
        exchange.go_ahead_from_start = start.proceed or start.HasField("go_ahead")
        exchange.operation, exchange.model = OPERATIONS[ENDPOINTS[start.endpoint]], start.model
        await self.serving.serve(ENDPOINTS[start.endpoint], start.body, start.request_id, start.model, exchange)

    async def CountTokens(
        self, request: inference_pb2.CountTokensRequest, context: Context
    ) -> inference_pb2.CountTokensResponse:
        engine = self._engine(request.model)
        ids = self._prompt_ids(engine, request.input)
        return inference_pb2.CountTokensResponse(prompt_tokens=len(ids), max_model_len=engine.max_model_len)

    async def GetLoad(self, request: inference_pb2.GetLoadRequest, context: Context) -> inference_pb2.GetLoadResponse:
        return _load_reply(self._engine().load(), self._identity)

    async def WatchLoad(
        self, request: inference_pb2.WatchLoadRequest, context: Context
    ) -> AsyncIterator[inference_pb2.WatchLoadResponse]:
        engine = self._engine()
        interval = (request.interval_ms or 250) / 1000
        sent = None
        while not self._draining.is_set():
            # Only a load that changed goes out: each report wakes the router and the replica, about 2.4 ms of
            # CPU between them on 2 cores, which an idle replica spent four times a second for nothing.
            if (load := engine.load()) != sent:
                yield inference_pb2.WatchLoadResponse(load=_load_reply(load, self._identity))
                sent = load
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._draining.wait(), interval)

    async def GetModel(
        self, request: inference_pb2.GetModelRequest, context: Context
    ) -> inference_pb2.GetModelResponse:
        engine = self._engine()
        return inference_pb2.GetModelResponse(model=engine.config.model_name, max_model_len=engine.max_model_len)
