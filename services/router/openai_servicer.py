"""The router's meshserve.llm.v2 servicer: OpenAI's JSON in HttpBody, the OpenAI API's answers out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from google.api import httpbody_pb2
from grpc import aio

from meshserve.llm.v2 import llm_pb2_grpc
from services.router import access, caller
from services.router.caller import Caller, RouteHints
from services.router.openai_api import CHAT, COMPLETIONS, OpenAIApi
from services.router.servicer import _status_name
from services.runtime.identity import MODEL_HEADER
from services.runtime.metadata import text_metadata

Context = aio.ServicerContext[Any, Any]
JSON = "application/json"
SSE = "text/event-stream"


class OpenAIServicer(llm_pb2_grpc.LlmServiceServicer):
    """meshserve.llm.v2.LlmService over OpenAIApi."""

    def __init__(self, api: OpenAIApi, require_caller: bool) -> None:
        self._api = api
        self._require_caller = require_caller

    def _caller(self, context: Context, entry: access.Access) -> tuple[Caller, RouteHints]:
        metadata = text_metadata(context)
        who = caller.from_metadata(metadata, self._require_caller)
        entry.tenant = who.tenant or "internal"
        entry.model = metadata.get(MODEL_HEADER, "")
        return who, caller.hints_from_metadata(metadata)

    async def _whole(self, method: str, endpoint: int, body: httpbody_pb2.HttpBody, context: Context) -> Any:
        with access.opened(method, _status_name) as entry:
            data = await self._api.whole(endpoint, body.data, *self._caller(context, entry))
            return httpbody_pb2.HttpBody(content_type=JSON, data=data)

    async def _stream(
        self, method: str, endpoint: int, body: httpbody_pb2.HttpBody, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        with access.opened(method, _status_name) as entry:
            async for event in self._api.stream(endpoint, body.data, *self._caller(context, entry)):
                yield httpbody_pb2.HttpBody(content_type=SSE, data=event)

    async def CreateChatCompletion(self, request: httpbody_pb2.HttpBody, context: Context) -> httpbody_pb2.HttpBody:
        return await self._whole("CreateChatCompletion", CHAT, request, context)

    async def StreamChatCompletion(
        self, request: httpbody_pb2.HttpBody, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async for event in self._stream("StreamChatCompletion", CHAT, request, context):
            yield event

    async def CreateCompletion(self, request: httpbody_pb2.HttpBody, context: Context) -> httpbody_pb2.HttpBody:
        return await self._whole("CreateCompletion", COMPLETIONS, request, context)

    async def StreamCompletion(
        self, request: httpbody_pb2.HttpBody, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async for event in self._stream("StreamCompletion", COMPLETIONS, request, context):
            yield event
