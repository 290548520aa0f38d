"""The OpenTelemetry GenAI semantic conventions (gen_ai.*) on spans, one vocabulary for the router and the
replicas, so tracing backends group meshserve's LLM calls as they group any other's. Imports no gRPC.

A generation's span is named "{gen_ai.operation.name} {gen_ai.request.model}" (the router's, around the replica
call, and the replica's, around the engine); meshserve.* attributes stay where they add something (tenant,
version, outcome).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from opentelemetry import trace

# gen_ai.operation.name values of the conventions.
CHAT, TEXT_COMPLETION, EMBEDDINGS = "chat", "text_completion", "embeddings"


def span_name(operation: str, model: str) -> str:
    return f"{operation} {model}"


def request_attributes(operation: str, model: str, response_id: str = "") -> dict[str, Any]:
    """A generation's attributes known before it runs."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": model,
        "gen_ai.response.model": model,
    }
    if response_id:
        attributes["gen_ai.response.id"] = response_id
    return attributes


def record_usage(span: trace.Span, input_tokens: int, output_tokens: int, finish_reasons: Iterable[str] = ()) -> None:
    """What the generation used, and why each choice ended (as vLLM says it: stop, length, abort, ...)."""
    span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
    if reasons := [r for r in finish_reasons if r]:
        span.set_attribute("gen_ai.response.finish_reasons", reasons)
