"""The router's gRPC servicer: protobuf in, domain calls, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from meshserve.llm.v1 import llm_pb2, llm_pb2_grpc
from services.router import caller
from services.router.caller import Caller, RouteHints
from services.router.completions import Completions
from services.runtime.metadata import text_metadata

Context = aio.ServicerContext[Any, Any]


class LlmServicer(llm_pb2_grpc.LlmServiceServicer):
    """meshserve.llm.v1.LlmService over Completions."""

    def __init__(self, completions: Completions, require_caller: bool) -> None:
        self._completions = completions
        self._require_caller = require_caller

    def _caller(self, context: Context) -> tuple[Caller, RouteHints]:
        metadata = text_metadata(context)
        return caller.from_metadata(metadata, self._require_caller), caller.hints_from_metadata(metadata)

    async def CreateChatCompletion(
        self, request: llm_pb2.CreateChatCompletionRequest, context: Context
    ) -> llm_pb2.CreateChatCompletionResponse:
        return await self._completions.chat(request.params, *self._caller(context))

    async def StreamChatCompletion(
        self, request: llm_pb2.StreamChatCompletionRequest, context: Context
    ) -> AsyncIterator[llm_pb2.StreamChatCompletionResponse]:
        async for chunk in self._completions.chat_stream(request.params, *self._caller(context)):
            yield chunk

    async def CreateCompletion(
        self, request: llm_pb2.CreateCompletionRequest, context: Context
    ) -> llm_pb2.CreateCompletionResponse:
        return await self._completions.completion(request.params, *self._caller(context))

    async def StreamCompletion(
        self, request: llm_pb2.StreamCompletionRequest, context: Context
    ) -> AsyncIterator[llm_pb2.StreamCompletionResponse]:
        async for chunk in self._completions.completion_stream(request.params, *self._caller(context)):
            yield chunk

    async def ListModels(self, request: llm_pb2.ListModelsRequest, context: Context) -> llm_pb2.ListModelsResponse:
        return self._completions.list_models(self._caller(context)[0])
