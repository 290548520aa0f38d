"""OpenTelemetry tracing for every service, configured by the standard OTEL_* variables.

Tracing is on when an OTLP endpoint is named (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
OTEL_EXPORTER_OTLP_ENDPOINT). Off, no tracer provider or exporter is installed, no call gets a span or
trace metadata, and the domain modules' spans are no-ops. On, the W3C `traceparent`
arrives in gRPC metadata (from Envoy or another service), the sampler follows the caller's decision
(OTEL_TRACES_SAMPLER, default parentbased_always_on; set parentbased_traceidratio and
OTEL_TRACES_SAMPLER_ARG for a ratio at roots), and spans leave in batches over OTLP/gRPC.

The runtime's interceptor opens each served call's span (server_span) and the router's clients open
one per outgoing call (client_call), carrying traceparent in the call's metadata.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

from opentelemetry import context, propagate, trace

log = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
# Calls that are not a request's work: health checks, reflection, and the router's load and model polls.
UNTRACED_METHODS = ("WatchLoad", "GetLoad", "GetModel")
_PROPAGATED = ("traceparent", "tracestate")
# version-trace_id-parent_id-flags (W3C Trace Context); a version other than 00 may append fields.
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-([0-9a-f]{2})(-.*)?$")


class _Unsampled(NamedTuple):
    """The trace of an unsampled call being served: its id (for the logs) and its metadata as it came."""

    trace_id: str
    metadata: tuple[tuple[str, str], ...]


# Passed on unchanged by the call's outgoing calls.
_UNSAMPLED: ContextVar[_Unsampled | None] = ContextVar("meshserve_unsampled_trace", default=None)

_provider: Any = None
# The one tracer of the process, made once when tracing turns on.
_tracer: trace.Tracer = trace.NoOpTracer()


def endpoint() -> str:
    """The OTLP endpoint tracing exports to; empty when tracing is off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return ""
    return next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), "")


def exporter_env(collector: str, sample_ratio: float) -> dict[str, str]:
    """The OTEL_* variables that turn a service's tracing on: spans to collector (host:port, OTLP/gRPC in
    plain text), the caller's sampling decision followed, sample_ratio of the traces it starts itself."""
    return {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://{collector}",
        "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": str(sample_ratio),
    }


def configure(service: str) -> bool:
    """Installs the tracer provider and OTLP exporter when an endpoint is set; True when tracing is on."""
    global _provider, _tracer
    if not endpoint() or _provider is not None:
        return _provider is not None
    # Imported only when on: the exporter pulls in a second gRPC stack's worth of modules.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create also reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, which win.
    resource = Resource.create({SERVICE_NAME: f"meshserve-{service}"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    _tracer = provider.get_tracer("meshserve")
    log.info("tracing on", extra={"otlp_endpoint": endpoint()})
    return True


async def shutdown() -> None:
    """Exports the spans still buffered, then stops the exporter."""
    if _provider is not None:
        await asyncio.to_thread(_provider.shutdown)


def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def traced(method: str) -> bool:
    """Whether calls of method (/package.Service/Method) get spans: a request's work, not health or polls."""
    if _provider is None or method.startswith(("/grpc.health.", "/grpc.reflection.")):
        return False
    return method.rsplit("/", 1)[-1] not in UNTRACED_METHODS


def _parse(traceparent: str) -> tuple[str, bool] | None:
    """A traceparent's trace id and whether it says sampled (bit 0 of its flags); None when malformed or all zeros."""
    match = _TRACEPARENT.match(traceparent)
    if match is None or match[1] == "0" * 32:
        return None
    return match[1], bool(int(match[2], 16) & 1)


def unsampled_trace_id() -> str:
    """The trace id of the unsampled call being served (which has no span of its own here), else empty."""
    unsampled = _UNSAMPLED.get()
    return unsampled.trace_id if unsampled is not None else ""


@contextmanager
def server_span(method: str, metadata: Iterable[tuple[str, Any]] | None) -> Iterator[trace.Span]:
    """The span of one served call, continuing the caller's trace from its traceparent metadata.

    A caller's trace that is not sampled gets no span here, and no OpenTelemetry context either: its
    metadata is kept as it came (a context variable), so that logs carry its trace id and outgoing calls
    pass it on unchanged, as W3C Trace Context lets a participant that records nothing do. 90% of requests
    are not sampled; extracting a context for each cost tens of microseconds of CPU per call, measured."""
    carrier = {k: v for k, v in metadata or () if k in _PROPAGATED}
    parsed = _parse(carrier.get("traceparent", ""))
    if parsed is not None and not parsed[1]:
        token = _UNSAMPLED.set(_Unsampled(parsed[0], tuple(carrier.items())))
        try:
            yield trace.INVALID_SPAN
        finally:
            _UNSAMPLED.reset(token)
        return
    parent = propagate.extract(carrier) if parsed is not None else None
    with _tracer.start_as_current_span(
        method, context=parent, kind=trace.SpanKind.SERVER, attributes=_rpc_attributes(method)
    ) as span:
        yield span


@contextmanager
def span(
    name: str, attributes: dict[str, Any] | None = None, kind: trace.SpanKind = trace.SpanKind.INTERNAL
) -> Iterator[trace.Span]:
    """A child of the current span, current while open, when the current span is recorded; else a no-op span."""
    if not trace.get_current_span().is_recording():
        yield trace.INVALID_SPAN
        return
    with _tracer.start_as_current_span(name, attributes=attributes, kind=kind) as opened:
        yield opened


def start_span(name: str, attributes: dict[str, Any] | None = None, traceparent: str | None = None) -> trace.Span:
    """Like span(), for a span the caller ends itself (span.end()); given a traceparent, a child of that instead
    of the current span (work done later for a traced request), recorded when the traceparent is sampled."""
    if traceparent is None:
        if not trace.get_current_span().is_recording():
            return trace.INVALID_SPAN
        return _tracer.start_span(name, attributes=attributes)
    parsed = _parse(traceparent)
    if _provider is None or parsed is None or not parsed[1]:
        return trace.INVALID_SPAN
    return _tracer.start_span(name, context=parent_context(traceparent), attributes=attributes)


@contextmanager
def client_call(method: str) -> Iterator[tuple[tuple[str, str], ...] | None]:
    """A client span around one outgoing call, and the metadata that carries the trace; None when tracing is off.

    Not an interceptor: grpc.aio's intercepted calls cost a task and a wrapper per call and message.
    An unrecorded trace gets no client span, only its context passed on."""
    if _provider is None:
        yield None
        return
    unsampled = _UNSAMPLED.get()
    if unsampled is not None:
        yield unsampled.metadata
        return
    with span(method, _rpc_attributes(method), trace.SpanKind.CLIENT):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        yield tuple(carrier.items())


def traceparent(span: trace.Span | None = None) -> str:
    """The W3C traceparent of span (default: the current one) when it is sampled, else empty."""
    span = span or trace.get_current_span()
    span_context = span.get_span_context()
    if not span_context.is_valid or not span_context.trace_flags.sampled:
        return ""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def parent_context(traceparent: str) -> context.Context | None:
    """The context a span should start in to be a child of traceparent; None for an empty one."""
    if not traceparent:
        return None
    return propagate.extract({"traceparent": traceparent})
