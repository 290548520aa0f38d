"""The server interceptor: a span per call when tracing is on, per-RPC metrics, domain errors to status codes."""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio
from opentelemetry.trace import Span, StatusCode

from services.runtime import callers, errors, metrics, tls, tracing
from services.runtime.openai_errors import ERROR_TYPE_HEADER

log = logging.getLogger(__name__)

STATUS_OF: dict[type[errors.DomainError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Internal: grpc.StatusCode.INTERNAL,
}


def status_of(exc: errors.DomainError) -> grpc.StatusCode:
    """The status code for a domain error: the nearest mapped base class, else INTERNAL."""
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


async def _abort_for(exc: errors.DomainError, context: aio.ServicerContext[Any, Any]) -> None:
    trailers = []
    if exc.retry_after_seconds is not None:
        trailers.append(("retry-after", str(max(1, round(exc.retry_after_seconds)))))
    if exc.error_type is not None:
        trailers.append((ERROR_TYPE_HEADER, exc.error_type))
    if trailers:
        context.set_trailing_metadata(tuple(trailers))
    await context.abort(status_of(exc), errors.bounded(str(exc)))


async def _abort_unexpected(exc: Exception, context: aio.ServicerContext[Any, Any], method: str) -> None:
    # A bug, not the caller's fault: logged with its stack here, INTERNAL with a bounded message there
    # (grpc's own answer would be UNKNOWN carrying the exception's text, of any length).
    log.exception("unexpected error", extra={"method": method})
    await context.abort(grpc.StatusCode.INTERNAL, errors.bounded(f"internal error: {exc.__class__.__name__}: {exc}"))


class _Undecodable:
    """Stands in for a request message that did not decode, so the handler can refuse it properly."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _decoding(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    # grpc answers a deserializer's exception with UNKNOWN ("Unexpected <class 'DecodeError'>"); a message
    # that is not the method's type (random bytes, truncated, invalid UTF-8, nested too deep) is the
    # caller's error, INVALID_ARGUMENT, and the handler raises it from the stand-in.
    if deserializer is None:
        return None

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:
            return _Undecodable(exc)

    return decode


def _refuse_undecodable(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise errors.InvalidArgument(f"the request message does not decode: {request.error}")


def _code_of(context: aio.ServicerContext[Any, Any]) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return str(code)


class ServiceInterceptor(aio.ServerInterceptor):
    """Counts and times every RPC, and turns DomainError into its own status code."""

    def __init__(self, service: str, identities: bool = False) -> None:
        self._service = service
        # With mutual TLS: every call is checked against the caller matrix by the peer's identity.
        self._identities = identities
        # Wrapped handlers by the handler they wrap: built once per method, not once per call.
        self._wrapped: dict[Any, Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        # Typed as Any: grpc's stubs describe sync handlers; under grpc.aio the behaviours are coroutines.
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return handler
        wrapped = self._wrapped.get(handler)
        if wrapped is None:
            wrapped = self._wrapped[handler] = self._wrap(handler, handler_call_details.method)
        return wrapped

    def _wrap(self, handler: Any, full_method: str) -> Any:
        service = self._service
        method = full_method.rsplit("/", 1)[-1]
        traced = tracing.traced(full_method)
        allowed = callers.allowed(full_method)
        identities = self._identities

        def admit(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
            _refuse_undecodable(request)
            if identities:
                callers.check(full_method, allowed, tls.peer_identity(context.auth_context()))

        def span_of(context: aio.ServicerContext[Any, Any]) -> contextlib.AbstractContextManager[Span | None]:
            if not traced:
                return contextlib.nullcontext()
            return tracing.server_span(full_method, context.invocation_metadata())

        def ended(span: Span | None, context: aio.ServicerContext[Any, Any], start: float) -> None:
            code = _code_of(context)
            metrics.observe_rpc(service, method, code, time.perf_counter() - start)
            if span is not None:
                span.set_attribute("rpc.grpc.status_code", code)
                if code != "OK":
                    span.set_status(StatusCode.ERROR, code)

        def awaited(inner: Any) -> Any:
            async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                start = time.perf_counter()
                with span_of(context) as span:
                    try:
                        admit(request, context)
                        return await inner(request, context)
                    except errors.DomainError as exc:
                        await _abort_for(exc, context)
                    except aio.AbortError:
                        raise
                    except Exception as exc:
                        await _abort_unexpected(exc, context, full_method)
                    finally:
                        ended(span, context, start)

            return call

        def generated(inner: Any) -> Any:
            async def stream(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                start = time.perf_counter()
                with span_of(context) as span:
                    try:
                        admit(request, context)
                        async for item in inner(request, context):
                            yield item
                    except errors.DomainError as exc:
                        await _abort_for(exc, context)
                    except aio.AbortError:
                        raise
                    except Exception as exc:
                        await _abort_unexpected(exc, context, full_method)
                    finally:
                        ended(span, context, start)

            return stream

        def either(inner: Any) -> Any:
            # A streaming handler either yields its replies or awaits context.write() (grpc-health's Watch).
            return generated(inner) if inspect.isasyncgenfunction(inner) else awaited(inner)

        serialize = _decoding(handler.request_deserializer), handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(awaited(handler.unary_unary), *serialize)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(either(handler.unary_stream), *serialize)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(awaited(handler.stream_unary), *serialize)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(either(handler.stream_stream), *serialize)
        return handler
