"""A stand-in router that answers ListModels with the metadata it received: for edge header tests."""

from __future__ import annotations

from typing import Any

from meshserve.llm.v1 import llm_pb2, llm_pb2_grpc
from services.runtime.server import Runtime, serve
from services.runtime.settings import ServiceSettings

SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name


class RecordingRouter(llm_pb2_grpc.LlmServiceServicer):
    async def ListModels(self, request: llm_pb2.ListModelsRequest, context: Any) -> llm_pb2.ListModelsResponse:
        seen = [llm_pb2.Model(id=f"{k}={v}", object="header") for k, v in context.invocation_metadata()]
        return llm_pb2.ListModelsResponse(object="list", data=seen)


def main() -> None:
    async def setup(rt: Runtime) -> None:
        llm_pb2_grpc.add_LlmServiceServicer_to_server(RecordingRouter(), rt.server)

    serve("recording-router", ServiceSettings(), [SERVICE], setup)


if __name__ == "__main__":
    main()
