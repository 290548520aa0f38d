"""An inference replica that replays a script instead of running a model: for edge and router error tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from meshserve.inference.v1 import inference_pb2 as ipb
from meshserve.inference.v1 import inference_pb2_grpc
from services.runtime.server import Runtime, serve
from services.runtime.settings import ServiceSettings

SERVICE = ipb.DESCRIPTOR.services_by_name["InferenceService"].full_name


class ScriptedInference(inference_pb2_grpc.InferenceServiceServicer):
    """Streams two tokens, then fails if the prompt says 'fail'; refuses outright for 'down'."""

    async def Generate(self, request: ipb.GenerateRequest, context: Any) -> AsyncIterator[ipb.GenerateResponse]:
        prompt = request.input.conversation.turns[-1].content
        if prompt == "down":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "engine is restarting")
        for i, text in enumerate(["Hello", " there"], 1):
            yield ipb.GenerateResponse(text=text, token_ids=[i], prompt_tokens=3, completion_tokens=i)
            await asyncio.sleep(0.05)
        if prompt == "fail":
            await context.abort(grpc.StatusCode.INTERNAL, "engine crashed")
        yield ipb.GenerateResponse(prompt_tokens=3, completion_tokens=2, finish_reason=ipb.FINISH_REASON_STOP)


def main() -> None:
    async def setup(rt: Runtime) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(ScriptedInference(), rt.server)

    serve("scripted-inference", ServiceSettings(), [SERVICE], setup)


if __name__ == "__main__":
    main()
