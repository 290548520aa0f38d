"""A replica's refusal of one Serve call reaches the router as its own status, whatever the router was writing.

grpc's client loses a call's status when the server ends a bidirectional call while the client is still
writing: the failed write sets the status to INTERNAL "Internal error from Core" (seen in CI: an image part
for a text-only model, refused by the replica while the router sent its go-ahead on condition, became a
500). So the replica says a refusal in-band and waits for the router to end the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from grpc import aio

from meshserve.inference.v1 import inference_pb2, inference_pb2_grpc
from services.inference.metering import Exchange
from services.inference.openai_serving import Endpoint
from services.inference.servicer import InferenceServicer
from services.router.replicas import GrpcReplica
from services.runtime import errors
from services.runtime.interceptors import ServiceInterceptor

MODEL = "tiny"


class Refusing:
    """A serving layer that refuses every request at once, as vLLM's refuses an image for a text-only model."""

    async def serve(self, endpoint: Endpoint, body: bytes, request_id: str, model: str, exchange: Exchange) -> None:
        exchange.replies.put_nowait(errors.InvalidArgument("image input is not supported by this model"))


@pytest.fixture
async def replica() -> AsyncIterator[GrpcReplica]:
    servicer = InferenceServicer()
    servicer.engine = SimpleNamespace(config=SimpleNamespace(model_name=MODEL))  # type: ignore[assignment]
    servicer.serving = Refusing()  # type: ignore[assignment]
    server = aio.server(interceptors=[ServiceInterceptor("inference")])
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = GrpcReplica(f"127.0.0.1:{port}")
    yield client
    await client.close()
    await server.stop(None)


def _start(model: str = MODEL) -> inference_pb2.ServeStart:
    return inference_pb2.ServeStart(
        request_id="r", model=model, endpoint=inference_pb2.ENDPOINT_CHAT_COMPLETIONS, body=b"{}"
    )


async def _outcome(replica: GrpcReplica, start: inference_pb2.ServeStart, delay: float) -> type[BaseException]:
    async def reserve(prompt_tokens: int, max_tokens: int) -> object:
        return None

    async def cover() -> tuple[int, int] | None:
        # The go-ahead on condition, sent about when the replica's refusal is on its way.
        await asyncio.sleep(delay)
        return (100, 100)

    try:
        async for _ in replica.serve(start, reserve, cover):
            pass
    except errors.DomainError as exc:
        return type(exc)
    return type(None)  # type: ignore[return-value]


async def test_a_refusal_while_the_router_writes_its_go_ahead_stays_the_callers_400(replica: GrpcReplica) -> None:
    # Before the refusal was in-band, about 1 in 150 of these read INTERNAL (a 500 to the caller).
    outcomes = [await _outcome(replica, _start(), (i % 10) / 2000) for i in range(300)]
    assert set(outcomes) == {errors.InvalidArgument}


async def test_a_replica_down_for_the_model_is_still_told_as_unavailable(replica: GrpcReplica) -> None:
    # NOT_FOUND in-band: the router reads it as the replica's fault (ejects, fails over), as before.
    assert await _outcome(replica, _start("another-model"), 0) is errors.Unavailable


async def test_a_caller_that_never_ends_the_call_is_let_go(replica: GrpcReplica, monkeypatch: Any) -> None:
    monkeypatch.setattr("services.inference.servicer.CALLER_ENDS_SECONDS", 0.2)
    channel = aio.insecure_channel(replica.address)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    call = stub.Serve()
    await call.write(inference_pb2.ServeRequest(start=_start()))
    refusal = await call.read()
    assert refusal.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "image" in refusal.error.message
    # The router would end the call here; this caller keeps it open, and the replica ends it with the status.
    with pytest.raises(aio.AioRpcError) as ended:
        await asyncio.wait_for(call.read(), 5)
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await channel.close()
