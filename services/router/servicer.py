"""The router's gRPC servicer: protobuf in, domain calls, protobuf out, one access log line per call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from meshserve.llm.v1 import llm_pb2, llm_pb2_grpc
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


def identify(context: Context, entry: access.Access, require_caller: bool) -> tuple[Caller, RouteHints]:
    """Who calls (from the edge's identity headers) and how they asked to be routed; noted in the access line."""
    metadata = text_metadata(context)
    who = caller.from_metadata(metadata, require_caller)
    entry.tenant = who.tenant or "internal"
    return who, caller.hints_from_metadata(metadata)


class LlmServicer(llm_pb2_grpc.LlmServiceServicer):
    """meshserve.llm.v1.LlmService over Completions."""

    def __init__(self, completions: Completions, require_caller: bool) -> None:
        self._completions = completions
        self._require_caller = require_caller

    def _caller(self, context: Context, entry: access.Access) -> tuple[Caller, RouteHints]:
        return identify(context, entry, self._require_caller)

    async def CreateChatCompletion(
        self, request: llm_pb2.CreateChatCompletionRequest, context: Context
    ) -> llm_pb2.CreateChatCompletionResponse:
        with access.opened("CreateChatCompletion", status_name) as entry:
            entry.model = request.params.model
            return await self._completions.chat(request.params, *self._caller(context, entry))

    async def StreamChatCompletion(
        self, request: llm_pb2.StreamChatCompletionRequest, context: Context
    ) -> AsyncIterator[llm_pb2.StreamChatCompletionResponse]:
        with access.opened("StreamChatCompletion", status_name) as entry:
            entry.model = request.params.model
            async for chunk in self._completions.chat_stream(request.params, *self._caller(context, entry)):
                yield chunk

    async def CreateCompletion(
        self, request: llm_pb2.CreateCompletionRequest, context: Context
    ) -> llm_pb2.CreateCompletionResponse:
        with access.opened("CreateCompletion", status_name) as entry:
            entry.model = request.params.model
            return await self._completions.completion(request.params, *self._caller(context, entry))

    async def StreamCompletion(
        self, request: llm_pb2.StreamCompletionRequest, context: Context
    ) -> AsyncIterator[llm_pb2.StreamCompletionResponse]:
        with access.opened("StreamCompletion", status_name) as entry:
            entry.model = request.params.model
            async for chunk in self._completions.completion_stream(request.params, *self._caller(context, entry)):
                yield chunk

    async def ListModels(self, request: llm_pb2.ListModelsRequest, context: Context) -> llm_pb2.ListModelsResponse:
        with access.opened("ListModels", status_name) as entry:
            return self._completions.list_models(self._caller(context, entry)[0])

    async def RetrieveModel(
        self, request: llm_pb2.RetrieveModelRequest, context: Context
    ) -> llm_pb2.RetrieveModelResponse:
        with access.opened("RetrieveModel", status_name) as entry:
            entry.model = request.model
            return self._completions.retrieve_model(request.model, self._caller(context, entry)[0])
