"""Serve with its go-ahead in the start, half-closed at once (one message each way less): the replica generates
only within the go-ahead, its measured counts ride on the first reply with data, and a request the go-ahead
does not cover is reserved as measured and served again, never generated twice."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from grpc import aio

from meshserve.inference.v1 import inference_pb2, inference_pb2_grpc
from services.inference.metering import Exchange, _measured
from services.inference.openai_serving import Endpoint
from services.inference.servicer import InferenceServicer
from services.router.accounting import Allowance
from services.router.replicas import SERVE, GrpcReplica
from services.runtime import errors
from services.runtime.interceptors import ServiceInterceptor

MODEL = "tiny"
PROMPT, MOST = 7, 16


class Counting:
    """A serving layer whose requests measure PROMPT prompt tokens and MOST at most, then answer one body; or,
    with fail set, fail after the measurement."""

    def __init__(self) -> None:
        self.served = 0
        self.generated = 0
        self.fail = False

    async def serve(self, endpoint: Endpoint, body: bytes, request_id: str, model: str, exchange: Exchange) -> None:
        self.served += 1
        exchange.prompt_tokens, exchange.max_tokens = PROMPT, MOST
        try:
            await _measured(exchange)
        except errors.DomainError as exc:
            exchange.replies.put_nowait(exc)
            return
        if self.fail:
            exchange.replies.put_nowait(errors.Internal("the engine failed"))
            return
        self.generated += 1
        exchange.completion_tokens = 2
        exchange.replies.put_nowait(exchange.reply(data=b'{"ok": true}', finished=True))
        exchange.replies.put_nowait(None)


@pytest.fixture
async def served() -> AsyncIterator[tuple[GrpcReplica, Counting, int]]:
    servicer = InferenceServicer()
    servicer.engine = SimpleNamespace(config=SimpleNamespace(model_name=MODEL))  # type: ignore[assignment]
    serving = Counting()
    servicer.serving = serving  # type: ignore[assignment]
    server = aio.server(interceptors=[ServiceInterceptor("inference")])
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = GrpcReplica(f"127.0.0.1:{port}")
    yield client, serving, port
    await client.close()
    await server.stop(None)


def _start() -> inference_pb2.ServeStart:
    return inference_pb2.ServeStart(
        request_id="r", model=MODEL, endpoint=inference_pb2.ENDPOINT_CHAT_COMPLETIONS, body=b"{}"
    )


async def _replies(
    replica: GrpcReplica, covered: tuple[int, int] | None, whole: bool = True, budgeted: bool = True, **kw: Any
) -> tuple[list[inference_pb2.ServeResponse], list[tuple[int, int]]]:
    reserved: list[tuple[int, int]] = []

    async def reserve(prompt_tokens: int, max_tokens: int) -> object:
        reserved.append((prompt_tokens, max_tokens))
        return None

    async def cover() -> tuple[int, int] | None:
        return covered

    replies = [r async for r in replica.serve(_start(), reserve if budgeted else None, cover, whole=whole, **kw)]
    return replies, reserved


async def test_a_covered_whole_request_is_one_message_each_way(served: tuple[GrpcReplica, Counting, int]) -> None:
    replica, serving, _ = served
    replies, reserved = await _replies(replica, (PROMPT + 3, MOST))
    # No message of its own for the measurement: the counts came with the body.
    assert [(r.data, r.measured, r.prompt_tokens, r.max_tokens) for r in replies] == [
        (b'{"ok": true}', True, PROMPT, MOST)
    ]
    assert reserved == [(PROMPT, MOST)]  # the guess's reservation learns the measured counts (no Redis: covered)
    assert (serving.served, serving.generated) == (1, 1)


async def test_an_uncovered_request_is_reserved_as_measured_and_served_again_once(
    served: tuple[GrpcReplica, Counting, int],
) -> None:
    replica, serving, _ = served
    replies, reserved = await _replies(replica, (PROMPT - 1, MOST))
    assert [r.data for r in replies] == [b'{"ok": true}']
    # Reserved as measured before anything was generated; the first call generated nothing.
    assert reserved == [(PROMPT, MOST)]
    assert (serving.served, serving.generated) == (2, 1)


async def test_unbudgeted_requests_go_at_once_and_streams_and_capped_ones_keep_the_exchange(
    served: tuple[GrpcReplica, Counting, int],
) -> None:
    replica, serving, _ = served
    replies, reserved = await _replies(replica, None, budgeted=False)
    assert [(r.data, r.measured) for r in replies] == [(b'{"ok": true}', True)] and reserved == []
    # A stream's reservation runs beside the rendering (the bidirectional call): same replies, same reservation.
    replies, reserved = await _replies(replica, (PROMPT + 3, MOST), whole=False)
    assert [r.data for r in replies] == [b'{"ok": true}'] and reserved == [(PROMPT, MOST)]
    capped = Allowance(tokens=MOST)
    replies, reserved = await _replies(replica, (PROMPT + 3, MOST), allowance=capped)
    assert [r.data for r in replies] == [b'{"ok": true}'] and reserved == [(PROMPT, MOST)]
    assert serving.generated == serving.served == 3


async def _raw(port: int, start: inference_pb2.ServeStart) -> list[inference_pb2.ServeResponse]:
    """The replies to start, half-closed at once; the call's status is the in-band error's, where one came."""
    replies: list[inference_pb2.ServeResponse] = []
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        once = channel.unary_stream(
            SERVE,
            request_serializer=inference_pb2.ServeRequest.SerializeToString,
            response_deserializer=inference_pb2.ServeResponse.FromString,
        )
        try:
            async for reply in once(inference_pb2.ServeRequest(start=start)):
                replies.append(reply)
        except aio.AioRpcError as exc:
            assert replies and exc.code().value[0] == replies[-1].error.code
    return replies


async def test_a_half_closed_start_that_does_not_cover_is_ended_without_generating(
    served: tuple[GrpcReplica, Counting, int],
) -> None:
    _, serving, port = served
    start = _start()
    start.go_ahead.prompt_tokens, start.go_ahead.max_tokens = PROMPT - 1, MOST
    replies = await _raw(port, start)
    assert replies[0].measured and not replies[0].data and replies[0].prompt_tokens == PROMPT
    assert replies[-1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "half-closed without a go-ahead" in replies[-1].error.message
    assert serving.generated == 0


async def test_a_request_failing_after_a_silent_measurement_still_reports_its_counts(
    served: tuple[GrpcReplica, Counting, int],
) -> None:
    _, serving, port = served
    serving.fail = True
    start = _start()
    start.proceed = True
    replies = await _raw(port, start)
    assert [(r.measured, r.prompt_tokens, r.HasField("error")) for r in replies] == [
        (True, PROMPT, False),
        (False, 0, True),
    ]
