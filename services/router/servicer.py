"""The router's gRPC servicer: protobuf in, domain calls, protobuf out, one access log line per call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from grpc import aio
from opentelemetry import trace

from meshserve.llm.v1 import llm_pb2, llm_pb2_grpc
from services.auth.authenticator import Authenticator
from services.auth.keys import authorization
from services.router import access, caller
from services.router.caller import Caller, RouteHints
from services.router.completions import Completions
from services.runtime.errors import DomainError
from services.runtime.interceptors import status_of
from services.runtime.metadata import text_metadata

Context = aio.ServicerContext[Any, Any]


def status_name(exc: BaseException) -> str:
    """The status code name of a call that ended with exc (for the access log)."""
    if isinstance(exc, DomainError):
        return status_of(exc).name
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return "UNKNOWN"


class Identify:
    """Who calls, and how they asked to be routed; noted in the access line.

    With the key store (keys), a generation call presents its API key (Authorization, or x-api-key) and the
    router checks it from the store's in-process cache, kept correct by its change channel: the edge skips its
    auth check on generation's routes, one service call less on every request. Every other call, and every
    call without the key store, carries the identity the edge's auth check attached (required unless
    require_caller is off)."""

    def __init__(self, require_caller: bool, keys: Authenticator | None = None) -> None:
        self._require_caller = require_caller
        self._keys = keys

    def edge(self, context: Context, entry: access.Access) -> tuple[Caller, RouteHints]:
        """From the identity headers of the edge's auth check."""
        metadata = text_metadata(context)
        return self._noted(caller.from_metadata(metadata, self._require_caller), metadata, entry)

    async def generation(self, context: Context, entry: access.Access) -> tuple[Caller, RouteHints]:
        """From the call's API key where the router checks keys; else as edge()."""
        if self._keys is None:
            return self.edge(context, entry)
        metadata = text_metadata(context)
        return self._noted(caller.from_key(await self._keys.check(authorization(metadata))), metadata, entry)

    @staticmethod
    def _noted(who: Caller, metadata: dict[str, str], entry: access.Access) -> tuple[Caller, RouteHints]:
        entry.tenant = who.tenant or "internal"
        trace.get_current_span().set_attribute("meshserve.tenant", entry.tenant)
        return who, caller.hints_from_metadata(metadata)


class LlmServicer(llm_pb2_grpc.LlmServiceServicer):
    """meshserve.llm.v1.LlmService over Completions."""

    def __init__(self, completions: Completions, identify: Identify) -> None:
        self._completions = completions
        self._identify = identify

    async def CreateChatCompletion(
        self, request: llm_pb2.CreateChatCompletionRequest, context: Context
    ) -> llm_pb2.CreateChatCompletionResponse:
        with access.opened("CreateChatCompletion", status_name) as entry:
            entry.model = request.params.model
            return await self._completions.chat(request.params, *await self._identify.generation(context, entry))

    async def StreamChatCompletion(
        self, request: llm_pb2.StreamChatCompletionRequest, context: Context
    ) -> AsyncIterator[llm_pb2.StreamChatCompletionResponse]:
        with access.opened("StreamChatCompletion", status_name) as entry:
            entry.model = request.params.model
            who, hints = await self._identify.generation(context, entry)
            async for chunk in self._completions.chat_stream(request.params, who, hints):
                yield chunk

    async def CreateCompletion(
        self, request: llm_pb2.CreateCompletionRequest, context: Context
    ) -> llm_pb2.CreateCompletionResponse:
        with access.opened("CreateCompletion", status_name) as entry:
            entry.model = request.params.model
            return await self._completions.completion(request.params, *await self._identify.generation(context, entry))

    async def StreamCompletion(
        self, request: llm_pb2.StreamCompletionRequest, context: Context
    ) -> AsyncIterator[llm_pb2.StreamCompletionResponse]:
        with access.opened("StreamCompletion", status_name) as entry:
            entry.model = request.params.model
            who, hints = await self._identify.generation(context, entry)
            async for chunk in self._completions.completion_stream(request.params, who, hints):
                yield chunk

    async def ListModels(self, request: llm_pb2.ListModelsRequest, context: Context) -> llm_pb2.ListModelsResponse:
        with access.opened("ListModels", status_name) as entry:
            return self._completions.list_models(self._identify.edge(context, entry)[0])

    async def RetrieveModel(
        self, request: llm_pb2.RetrieveModelRequest, context: Context
    ) -> llm_pb2.RetrieveModelResponse:
        with access.opened("RetrieveModel", status_name) as entry:
            entry.model = request.model
            return self._completions.retrieve_model(request.model, self._identify.edge(context, entry)[0])
