"""Inference replicas over gRPC: one channel per address, engine errors as domain errors."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, cast

import grpc
from grpc import aio

from meshserve.inference.v1 import inference_pb2, inference_pb2_grpc
from services.router.accounting import Allowance
from services.router.balancer import LoadReport
from services.runtime import errors, keepalive, tls, tracing

# Keepalive notices a dead replica on an idle channel; the service config lets gRPC
# itself retry a call that failed before the replica answered anything. round_robin spreads
# calls over every address a target resolves to: a Kubernetes headless Service
# (dns:///inference-headless:50051) is the set of ready replicas.
_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": "meshserve.inference.v1.InferenceService"}],
                "waitForReady": False,
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)
_OPTIONS = [
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    *keepalive.channel_options(),
    # A restarted replica is reached again within seconds, not after gRPC's default backoff of up to 2 minutes.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
GENERATE, COUNT_TOKENS, SERVE = f"/{_SERVICE}/Generate", f"/{_SERVICE}/CountTokens", f"/{_SERVICE}/Serve"


# Codes that say the replica itself cannot serve (down, restarting, still loading): the router ejects it
# and fails over. Every other code is about this one request (its input, its deadline, a fault while
# generating it) and is passed to the caller without ejecting a replica that serves everyone else.
_REPLICA_DOWN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def domain_error(exc: aio.AioRpcError, address: str) -> errors.DomainError:
    """The domain error a caller should see for a failed engine call."""
    return _domain_error(exc.code(), exc.details() or "", address)


def _in_band(error: inference_pb2.ServeError, address: str) -> errors.DomainError:
    return _domain_error(_CODES.get(error.code, grpc.StatusCode.UNKNOWN), error.message, address)


def _domain_error(code: grpc.StatusCode, details: str, address: str) -> errors.DomainError:
    details = errors.bounded(details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return errors.InvalidArgument(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return errors.ResourceExhausted(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.DeadlineExceeded(f"inference replica {address} did not answer in time: {details}")
    if code in _REPLICA_DOWN:
        return errors.Unavailable(f"inference replica {address} failed: {code.name}: {details}")
    return errors.Internal(f"inference replica {address} failed on this request: {code.name}: {details}")


def _within(reply: inference_pb2.ServeResponse, covered: tuple[int, int]) -> bool:
    return reply.prompt_tokens <= covered[0] and reply.max_tokens <= covered[1]


def _bare(reply: inference_pb2.ServeResponse) -> bool:
    """A measurement on its own (not riding on a reply with data, as it does where the start let it go ahead)."""
    return reply.measured and not (reply.data or reply.finish_reason or reply.failed)


def _proceed(allowance: Allowance | None, prompt_tokens: int = 0, max_tokens: int = 0) -> inference_pb2.ServeRequest:
    """A go-ahead (on condition where prompt_tokens is set), capped where spend budgets pay for the tokens."""
    proceed = inference_pb2.ServeProceed(prompt_tokens=prompt_tokens, max_tokens=max_tokens)
    if allowance is not None and allowance.tokens is not None:
        proceed.capped, proceed.allowance_tokens = True, allowance.tokens
    return inference_pb2.ServeRequest(proceed=proceed)


async def _go_ahead_on_condition(
    call: Any, cover: Callable[[], Awaitable[tuple[int, int] | None]], allowance: Allowance | None
) -> tuple[int, int] | None:
    """Sends the go-ahead on condition once tokens reserved on a guess hold; what it covers, or None.

    Awaited before the first read, not beside it: the replica sends nothing past its measurement until it has a
    go-ahead, so reading sooner would not start anything sooner (and a task per request costs CPU)."""
    covered = await cover()
    if covered is not None:
        await call.write(_proceed(allowance, max(1, covered[0]), covered[1]))
    return covered


if TYPE_CHECKING:  # the generated stub, as typed on an asyncio channel
    _Stub = inference_pb2_grpc.InferenceServiceAsyncStub
else:
    _Stub = inference_pb2_grpc.InferenceServiceStub


class _ReplicaStub(_Stub):
    """The replica's stub, and its Serve called with one request message: gRPC sends the call's headers, the
    message and the half-close in one operation (three as a bidirectional call: headers, start and go-ahead,
    each its own write and wake-up of the replica)."""

    def __init__(self, channel: aio.Channel) -> None:
        super().__init__(channel)
        self.ServeOnce = channel.unary_stream(
            SERVE,
            request_serializer=inference_pb2.ServeRequest.SerializeToString,
            response_deserializer=inference_pb2.ServeResponse.FromString,
        )


class GrpcReplica:
    """One inference replica."""

    def __init__(self, address: str, files: tls.Files | None = None) -> None:
        self.address = address
        self._channel = tls.MeshChannel(address, files, "inference", _ReplicaStub, _OPTIONS)

    async def generate(
        self, request: inference_pb2.GenerateRequest
    ) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        with tracing.client_call(GENERATE) as metadata:
            call = self._channel.stub.Generate(request, metadata=metadata)
            try:
                async for step in call:
                    yield step
            except aio.AioRpcError as exc:
                raise domain_error(exc, self.address) from exc
            finally:
                # Closing early (client gone, router stopping) must abort the generation on the engine.
                call.cancel()

    async def serve(
        self,
        start: inference_pb2.ServeStart,
        reserve: Callable[[int, int], Awaitable[object]] | None,
        cover: Callable[[], Awaitable[tuple[int, int] | None]] | None = None,
        allowance: Allowance | None = None,
        whole: bool = False,
    ) -> AsyncGenerator[inference_pb2.ServeResponse, None]:
        covered: tuple[int, int] | None = None
        if whole and reserve is not None and cover is not None:
            # The caller says the guess's reservation has landed: its go-ahead goes with the start.
            covered = await cover()
        once = (reserve is None or covered is not None) and (allowance is None or allowance.tokens is None)
        # Nothing more to say after the start (no go-ahead to wait for, no allowance to raise): one message.
        served = self._serve_once(start, reserve, covered) if once else self._serve(start, reserve, cover, allowance)
        async with aclosing(served) as replies:
            async for reply in replies:
                yield reply

    async def _serve_once(
        self,
        start: inference_pb2.ServeStart,
        reserve: Callable[[int, int], Awaitable[object]] | None,
        covered: tuple[int, int] | None,
    ) -> AsyncGenerator[inference_pb2.ServeResponse, None]:
        """The start with its go-ahead (or proceed), half-closed at once; where the replica's measurement falls
        outside the go-ahead, its counts are reserved and the request is served again with a go-ahead."""
        opening = inference_pb2.ServeStart()
        opening.CopyFrom(start)
        if covered is None:
            opening.proceed = True
        else:
            opening.go_ahead.prompt_tokens, opening.go_ahead.max_tokens = max(1, covered[0]), covered[1]
        uncovered = False
        with tracing.client_call(SERVE) as metadata:
            # Serve's own method, called with one request message: gRPC sends it, and the half-close, at once.
            call = self._channel.stub.ServeOnce(inference_pb2.ServeRequest(start=opening), metadata=metadata)
            try:
                async for reply in call:
                    if reply.HasField("error"):
                        raise _in_band(reply.error, self.address)
                    if reply.measured and reserve is not None:
                        await reserve(reply.prompt_tokens, reply.max_tokens)
                        # The replica decides as this does: outside what the go-ahead covers, it waits no more.
                        if covered is None or not _within(reply, covered):
                            uncovered = True
                            break
                    if _bare(reply):
                        continue  # on its own only where it was not covered
                    yield reply
            except aio.AioRpcError as exc:
                raise domain_error(exc, self.address) from exc
            finally:
                call.cancel()
        if uncovered:  # reserved as measured: served again, going ahead at once
            async with aclosing(self._serve(start, None)) as again:
                async for reply in again:
                    yield reply

    async def _serve(
        self,
        start: inference_pb2.ServeStart,
        reserve: Callable[[int, int], Awaitable[object]] | None,
        cover: Callable[[], Awaitable[tuple[int, int] | None]] | None = None,
        allowance: Allowance | None = None,
    ) -> AsyncGenerator[inference_pb2.ServeResponse, None]:
        with tracing.client_call(SERVE) as metadata:
            call = self._channel.stub.Serve(metadata=metadata)
            covered: tuple[int, int] | None = None
            max_tokens = 0
            try:
                # Nothing to reserve: the replica generates at once, without waiting for a go-ahead.
                opening = inference_pb2.ServeStart()
                opening.CopyFrom(start)
                opening.proceed = reserve is None
                await call.write(inference_pb2.ServeRequest(start=opening))
                # Never half-closed: the replica ends the call with its last reply (and stops reading the
                # caller's messages then), and an uncapped request has nothing more to say; a half-close was
                # one more gRPC operation per request, 10 of the router's 166 system calls (bench.syscalls).
                if reserve is not None and cover is not None:
                    covered = await _go_ahead_on_condition(call, cover, allowance)
                while (read := await call.read()) is not aio.EOF:
                    reply = cast(inference_pb2.ServeResponse, read)
                    if reply.HasField("error"):
                        raise _in_band(reply.error, self.address)
                    if reply.measured:
                        if reserve is not None:
                            max_tokens = reply.max_tokens
                            await reserve(reply.prompt_tokens, reply.max_tokens)
                            # The replica decides as this does: within what the guess covers, it went ahead.
                            if covered is None or not _within(reply, covered):
                                await call.write(_proceed(allowance))
                        if _bare(reply):
                            continue
                    if reply.wants_allowance and allowance is not None:
                        more = await allowance.raise_for(reply.completion_tokens, max_tokens)
                        room = inference_pb2.ServeAllowance(completion_tokens=more)
                        await call.write(inference_pb2.ServeRequest(allowance=room))
                        continue
                    yield reply
            except aio.AioRpcError as exc:
                raise domain_error(exc, self.address) from exc
            finally:
                # Closing early (client gone, router stopping) must abort the generation on the engine.
                call.cancel()

    async def count_tokens(self, request: inference_pb2.GenerateRequest) -> tuple[int, int]:
        try:
            with tracing.client_call(COUNT_TOKENS) as metadata:
                counted = await self._channel.stub.CountTokens(
                    inference_pb2.CountTokensRequest(model=request.model, input=request.input),
                    timeout=10,
                    metadata=metadata,
                )
        except aio.AioRpcError as exc:
            raise domain_error(exc, self.address) from exc
        return counted.prompt_tokens, counted.max_model_len

    async def watch_load(self, interval_ms: int) -> AsyncGenerator[LoadReport, None]:
        """The replica's load reports, until the stream breaks (DomainError) or the replica drains (it ends)."""
        call = self._channel.stub.WatchLoad(inference_pb2.WatchLoadRequest(interval_ms=interval_ms))
        try:
            async for reply in call:
                load = reply.load
                yield LoadReport(
                    load.running,
                    load.waiting,
                    load.kv_cache_usage,
                    max(1, load.max_num_seqs),
                    load.pool,
                    load.quantization,
                    load.kv_cache_dtype,
                )
        except aio.AioRpcError as exc:
            raise domain_error(exc, self.address) from exc
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()
