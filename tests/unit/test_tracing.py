"""Tracing's pieces without a collector: off adds nothing, a traceparent round-trips, the access line."""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from services.mesh.local import MeshOptions
from services.router import access
from services.runtime import errors, tracing
from services.runtime.logs import JsonFormatter


def test_off_without_an_endpoint_traces_no_call(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in tracing.ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert tracing.endpoint() == ""
    assert not tracing.configure("test")
    assert not tracing.traced("/meshserve.llm.v1.LlmService/CreateChatCompletion")
    with tracing.client_call("/meshserve.inference.v1.InferenceService/Generate") as metadata:
        assert metadata is None  # the call goes out without trace metadata
    # The API's no-op spans carry nothing to join.
    assert tracing.traceparent() == "" and tracing.parent_context("") is None


def test_an_endpoint_turns_it_on_unless_the_sdk_is_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    assert tracing.endpoint() == "http://127.0.0.1:4317"
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.endpoint() == ""


def test_a_sampled_spans_traceparent_makes_a_child_in_its_trace() -> None:
    tracer = TracerProvider().get_tracer("test")
    parent = tracer.start_span("router.generate")
    header = tracing.traceparent(parent)
    ctx = parent.get_span_context()
    version, trace_id, span_id, flags = header.split("-")
    assert (version, trace_id, span_id) == ("00", f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert int(flags, 16) & 1  # sampled
    child = tracer.start_span("billing.record_usage", context=tracing.parent_context(header))
    assert child.get_span_context().trace_id == ctx.trace_id
    assert child.parent is not None and child.parent.span_id == ctx.span_id


def test_log_records_inside_a_span_carry_its_trace_id() -> None:
    tracer = TracerProvider().get_tracer("test")
    formatter = JsonFormatter("router")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    assert "trace_id" not in json.loads(formatter.format(record))
    with tracer.start_as_current_span("call") as span:
        line = json.loads(formatter.format(record))
    assert line["trace_id"] == f"{span.get_span_context().trace_id:032x}"


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracing on in this process, with the SDK's default sampler (the caller's decision, else always)."""
    provider = TracerProvider()
    monkeypatch.setattr(tracing, "_provider", provider)
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))


@pytest.mark.usefixtures("traced")
def test_an_unsampled_callers_trace_gets_no_span_but_is_logged_and_passed_on_unchanged() -> None:
    trace_id = secrets.token_hex(16)
    incoming = (
        ("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-00"),
        ("tracestate", "vendor=opaque"),
        ("user-agent", "grpc-python"),
    )
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    with tracing.server_span("/meshserve.llm.v1.LlmService/CreateChatCompletion", incoming) as span:
        assert not span.is_recording()
        with tracing.span("router.choose_replica") as inner:
            assert not inner.is_recording()
        assert tracing.traceparent() == ""  # nothing for billing to join
        with tracing.client_call("/meshserve.inference.v1.InferenceService/Generate") as metadata:
            assert metadata == incoming[:2]
        assert json.loads(JsonFormatter("router").format(record))["trace_id"] == trace_id
    assert tracing.unsampled_trace_id() == ""
    assert "trace_id" not in json.loads(JsonFormatter("router").format(record))


@pytest.mark.usefixtures("traced")
def test_a_sampled_callers_trace_is_continued() -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    incoming = (("traceparent", f"00-{trace_id}-{parent_id}-01"),)
    with tracing.server_span("/meshserve.llm.v1.LlmService/CreateChatCompletion", incoming) as span:
        assert span.is_recording()
        assert f"{span.get_span_context().trace_id:032x}" == trace_id
        assert span.parent is not None and f"{span.parent.span_id:016x}" == parent_id
        with tracing.client_call("/meshserve.inference.v1.InferenceService/Generate") as metadata:
            assert metadata is not None
            (key, header), *_ = metadata
            assert key == "traceparent" and header.startswith(f"00-{trace_id}-") and header.endswith("-01")


@pytest.mark.usefixtures("traced")
@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        f"00-{'0' * 32}-{secrets.token_hex(8)}-00",  # the all-zero trace id is invalid
        f"00-{secrets.token_hex(16).upper()}-{secrets.token_hex(8)}-00",  # upper case is invalid
        f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-0",
    ],
)
def test_a_missing_or_malformed_traceparent_starts_a_new_trace(header: str) -> None:
    incoming = (("traceparent", header),) if header else ()
    with tracing.server_span("/meshserve.llm.v1.LlmService/CreateChatCompletion", incoming) as span:
        assert span.is_recording() and span.parent is None


def test_the_access_line_says_how_the_call_ended(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="services.router.access")
    with access.opened("CreateChatCompletion", lambda exc: type(exc).__name__) as entry:
        entry.model, entry.tenant = "m", "t"
        assert access.CURRENT.get() is entry
    with pytest.raises(errors.NotFound), access.opened("CreateChatCompletion", lambda exc: "NOT_FOUND"):
        raise errors.NotFound("no such model")
    assert access.CURRENT.get() is None
    lines = [r for r in caplog.records if r.getMessage() == "access"]
    assert [(r.status, r.model) for r in lines] == [("OK", "m"), ("NOT_FOUND", "")]  # type: ignore[attr-defined]
    assert all(r.latency_ms >= 0 for r in lines)  # type: ignore[attr-defined]


def test_the_local_mesh_gives_every_service_the_same_collector_or_none() -> None:
    assert MeshOptions(state_dir=Path("x")).tracing_env() == {}
    env = MeshOptions(state_dir=Path("x"), otlp_endpoint="127.0.0.1:4317", trace_sample_ratio=0.25).tracing_env()
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://127.0.0.1:4317"
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio" and env["OTEL_TRACES_SAMPLER_ARG"] == "0.25"
