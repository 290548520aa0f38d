"""The router's meshserve.llm.v2 servicer: OpenAI's (or Anthropic's) JSON in HttpBody, that API's answers out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from google.api import httpbody_pb2
from grpc import aio

from meshserve.llm.v2 import llm_pb2, llm_pb2_grpc
from services.router import access
from services.router.openai_api import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, RESPONSES, OpenAIApi, ResponseMeta
from services.router.servicer import Identify, status_name

Context = aio.ServicerContext[Any, Any]
JSON = "application/json"
SSE = "text/event-stream"


class OpenAIServicer(llm_pb2_grpc.LlmServiceServicer):
    """meshserve.llm.v2.LlmService over OpenAIApi."""

    def __init__(self, api: OpenAIApi, identify: Identify) -> None:
        self._api = api
        self._identify = identify

    async def _whole(self, method: str, endpoint: int, body: httpbody_pb2.HttpBody, context: Context) -> Any:
        with access.opened(method, status_name) as entry:
            meta = ResponseMeta()
            data = await self._api.whole(endpoint, body.data, *await self._identify.generation(context, entry), meta)
            if headers := meta.headers():
                await context.send_initial_metadata(headers)
            return httpbody_pb2.HttpBody(content_type=JSON, data=data)

    async def _stream(
        self, method: str, endpoint: int, body: httpbody_pb2.HttpBody, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        with access.opened(method, status_name) as entry:
            meta = ResponseMeta()
            first = True
            who, hints = await self._identify.generation(context, entry)
            async for event in self._api.stream(endpoint, body.data, who, hints, meta):
                if first and (headers := meta.headers()):
                    # As response headers (the transcoder makes them so), before the first event.
                    await context.send_initial_metadata(headers)
                first = False
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

    async def CreateMessage(self, request: httpbody_pb2.HttpBody, context: Context) -> httpbody_pb2.HttpBody:
        return await self._whole("CreateMessage", MESSAGES, request, context)

    async def StreamMessage(
        self, request: httpbody_pb2.HttpBody, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async for event in self._stream("StreamMessage", MESSAGES, request, context):
            yield event

    async def CreateResponse(self, request: httpbody_pb2.HttpBody, context: Context) -> httpbody_pb2.HttpBody:
        return await self._whole("CreateResponse", RESPONSES, request, context)

    async def StreamResponse(
        self, request: httpbody_pb2.HttpBody, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async for event in self._stream("StreamResponse", RESPONSES, request, context):
            yield event

    async def CreateEmbedding(self, request: httpbody_pb2.HttpBody, context: Context) -> httpbody_pb2.HttpBody:
        return await self._whole("CreateEmbedding", EMBEDDINGS, request, context)

    async def GetResponse(self, request: llm_pb2.GetResponseRequest, context: Context) -> httpbody_pb2.HttpBody:
        with access.opened("GetResponse", status_name) as entry:
            caller, _ = self._identify.edge(context, entry)
            return httpbody_pb2.HttpBody(
                content_type=JSON, data=await self._api.get_response(request.response_id, caller)
            )
