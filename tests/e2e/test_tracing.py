"""One trace per request, from the Envoy edge through auth, rate limits, router, inference and billing."""

from __future__ import annotations

import json
import secrets
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from services.mesh.local import LocalMesh
from tests.e2e.helpers import MODEL, QUESTION
from tests.otlp_receiver import Receiver, Span

pytestmark = pytest.mark.mesh

# The router's span of one generation: "{gen_ai.operation.name} {gen_ai.request.model}".
GENERATION = f"chat {MODEL}"

SERVER, CLIENT = 2, 3  # OTLP SpanKind values


def chat(mesh: LocalMesh, headers: dict[str, str] | None = None) -> str:
    """One chat completion over REST; its request id."""
    body = json.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": 4, "temperature": 0}).encode()
    request = urllib.request.Request(
        f"{mesh.edge_url}/v1/chat/completions",
        data=body,
        headers={"authorization": f"Bearer {mesh.user_key}", "content-type": "application/json", **(headers or {})},
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return str(json.loads(reply.read())["id"])


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def generation(spans: Sequence[Span], request_id: str) -> Span | None:
    return next(
        (s for s in spans if s.name == GENERATION and s.attributes.get("meshserve.request_id") == request_id),
        None,
    )


def whole_trace(otlp: Receiver, request_id: str) -> list[Span]:
    """Every span of the request's trace, once the whole path has arrived (each service exports on its own
    schedule, so spans of one trace arrive over a few hundred milliseconds), or what came within 30 s."""

    def of_request(spans: list[Span]) -> list[Span]:
        gen = generation(spans, request_id)
        return [s for s in spans if gen is not None and s.trace_id == gen.trace_id]

    def complete(spans: list[Span]) -> bool:
        try:
            check_path(of_request(spans))
            assert_one_tree(of_request(spans))
        except (AssertionError, KeyError, StopIteration):
            return False
        return True

    spans = otlp.wait_for(complete, timeout=30)
    assert generation(spans, request_id) is not None, f"no {GENERATION!r} span for {request_id}"
    return of_request(spans)


def one(spans: Sequence[Span], service: str, name: str, parent: Span | None = None) -> Span:
    """The single span of service named name (under parent when given)."""
    found = [
        s
        for s in spans
        if s.service == service and s.name == name and (parent is None or s.parent_span_id == parent.span_id)
    ]
    assert len(found) == 1, f"{len(found)} spans {service}/{name} under {parent and parent.name}: {describe(spans)}"
    return found[0]


def describe(spans: Sequence[Span]) -> str:
    return "; ".join(f"{s.service}/{s.name} {s.span_id}<-{s.parent_span_id or 'root'}" for s in spans)


def assert_one_tree(spans: Sequence[Span]) -> Span:
    """Every span's parent is in the trace, except one root; the root."""
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if s.parent_span_id not in ids]
    assert len(roots) == 1, f"{len(roots)} roots: {describe(spans)}"
    return roots[0]


def check_path(spans: Sequence[Span]) -> Span:
    """The request's path through the mesh, span by span, each under the one that caused it; the edge's span."""
    by_id = {s.span_id: s for s in spans}
    edge = next(s for s in spans if s.service == "meshserve-edge" and s.kind == SERVER)

    # A generation's key is checked by the router (no ext_authz call), and its request limits are the router's
    # first reservation's, not a check by the edge.
    assert not [s for s in spans if s.service == "meshserve-auth"], describe(spans)
    assert not [s for s in spans if s.name.endswith("/ShouldRateLimit")], describe(spans)

    router = one(spans, "meshserve-router", "/meshserve.llm.v2.LlmService/CreateChatCompletion")
    assert by_id[router.parent_span_id].service == "meshserve-edge", describe(spans)
    assert router.attributes["meshserve.tenant"] and router.attributes["rpc.grpc.status_code"] == "OK"
    one(spans, "meshserve-router", "router.queue_wait", router)
    gen = one(spans, "meshserve-router", GENERATION, router)
    # Named and described by the OpenTelemetry GenAI conventions, as tracing backends group LLM calls.
    assert gen.attributes["gen_ai.operation.name"] == "chat" and gen.attributes["gen_ai.request.model"] == MODEL
    assert gen.attributes["gen_ai.usage.output_tokens"] == 4 and gen.attributes["gen_ai.usage.input_tokens"] > 0
    one(spans, "meshserve-router", "router.choose_replica", gen)

    serve_call = one(spans, "meshserve-router", "/meshserve.inference.v1.InferenceService/Serve", gen)
    assert serve_call.kind == CLIENT
    # The first reservation counts the request as it comes in (and holds a guess, with history); the
    # measured prompt's tokens are reserved during the Serve call unless the guess covered them.
    # Both are decided in the router, on the rate-limit service's Redis: no call to the service on the path.
    assert not [s for s in spans if s.service == "meshserve-ratelimit"], describe(spans)
    reserves = [s for s in spans if s.service == "meshserve-router" and s.name == "router.reserve"]
    (counted,) = [s for s in reserves if s.attributes["meshserve.request_counted"]]
    assert counted.parent_span_id == router.span_id, describe(spans)
    for reserve in reserves:
        assert reserve.parent_span_id in (router.span_id, gen.span_id, serve_call.span_id)
    assert sum(s.attributes["meshserve.reserved_tokens"] for s in reserves) > 0

    engine_call = one(spans, "meshserve-inference", "/meshserve.inference.v1.InferenceService/Serve", serve_call)
    # The replica's span around the engine, by the same conventions: max_tokens 4 ends at length.
    engine = one(spans, "meshserve-inference", GENERATION, engine_call)
    assert "first_token" in engine.events
    assert engine.attributes["gen_ai.operation.name"] == "chat" and engine.attributes["gen_ai.request.model"] == MODEL
    assert engine.attributes["gen_ai.usage.output_tokens"] == 4
    assert engine.attributes["gen_ai.usage.input_tokens"] == gen.attributes["gen_ai.usage.input_tokens"]
    assert engine.attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert gen.attributes["gen_ai.response.id"] == gen.attributes["meshserve.request_id"]

    one(spans, "meshserve-billing", "billing.record_usage", gen)
    assert "first_token" in gen.events
    return edge


def test_a_request_is_one_trace_from_the_edge_to_billing(mesh: LocalMesh, otlp: Receiver) -> None:
    request_id = chat(mesh)
    spans = whole_trace(otlp, request_id)
    root = assert_one_tree(spans)
    edge = check_path(spans)
    # The edge started the trace: its span is the root.
    assert root == edge


def test_the_edge_continues_a_callers_trace(mesh: LocalMesh, otlp: Receiver) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    request_id = chat(mesh, {"traceparent": f"00-{trace_id}-{parent_id}-01"})
    spans = whole_trace(otlp, request_id)
    assert {s.trace_id for s in spans} == {trace_id}
    edge = check_path(spans)
    # The caller's span is the parent of the edge's (the caller exports it, not the mesh).
    assert edge.parent_span_id == parent_id
    assert [s for s in spans if s.parent_span_id == parent_id] == [edge]


def test_logs_carry_the_trace_id_and_the_router_logs_one_access_line(mesh: LocalMesh, otlp: Receiver) -> None:
    trace_id = secrets.token_hex(16)
    forged = {"x-meshserve-tenant": "forged"}
    request_id = chat(mesh, {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01", **forged})
    whole_trace(otlp, request_id)
    access = [
        r for r in json_lines(mesh.procs["router"].log) if r.get("msg") == "access" and r.get("trace_id") == trace_id
    ]
    assert len(access) == 1, access
    line = access[0]
    assert line["method"] == "CreateChatCompletion" and line["status"] == "OK" and line["outcome"] == "completed"
    assert line["model"] == MODEL and line["tenant"] and line["completion_tokens"] == 4 and line["prompt_tokens"] > 0
    assert line["latency_ms"] >= line["ttft_ms"] > 0
    # Envoy flushes its access log every second.
    deadline = time.monotonic() + 15
    while True:
        edge = [r for r in json_lines(mesh.procs["envoy"].log) if r.get("trace_id") == trace_id]
        if edge or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # The router checked the key: the tenant is in its line; the edge's has none (nor one a client forged).
    assert len(edge) == 1 and edge[0]["model"] == MODEL and edge[0]["tenant"] in (None, "-", ""), edge


def test_an_unsampled_callers_trace_is_logged_and_passed_on_but_never_recorded(mesh: LocalMesh, otlp: Receiver) -> None:
    trace_id = secrets.token_hex(16)
    chat(mesh, {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-00"})
    # Once a later request's whole trace has arrived, every service has exported what it had before it.
    whole_trace(otlp, chat(mesh))
    assert [s for s in otlp.spans() if s.trace_id == trace_id] == []
    # The router served it with no span of its own and still logged under the caller's trace id.
    access = [
        r for r in json_lines(mesh.procs["router"].log) if r.get("msg") == "access" and r.get("trace_id") == trace_id
    ]
    assert len(access) == 1 and access[0]["status"] == "OK" and "span_id" not in access[0], access
