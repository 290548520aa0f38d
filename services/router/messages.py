"""Anthropic's Messages API (POST /v1/messages): its request rules and its error shape. Imports no gRPC.

vLLM's own Anthropic layer on the replica reads the body (it turns it into a chat request: the same model
template, tool parser and sampling as chat); the router refuses, before any token is reserved, what
Anthropic's contract forbids and vLLM would accept: a missing max_tokens is vLLM's rule too, but a
temperature above 1, a role other than user and assistant, or a non-finite number are only Anthropic's.
"""

from __future__ import annotations

import json
from typing import Any

from services.router.validation import MAX_STOP, finite, in_range, number
from services.runtime.errors import DomainError, Internal, InvalidArgument, bounded, echo
from services.runtime.openai_errors import anthropic_error_body

ROLES = ("user", "assistant")
# The last event of a whole stream.
STOP_EVENT = b"event: message_stop\n"


def _blocks(value: Any, where: str) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(b, dict) and isinstance(b.get("type"), str) for b in value):
        raise InvalidArgument(f"{where}: must be a string or a list of content blocks (each with a type)")


def contract(fields: dict[str, Any]) -> None:
    """Anthropic's rules that vLLM does not enforce (and max_tokens, which both require)."""
    finite(fields)
    max_tokens = fields.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise InvalidArgument(f"max_tokens: is required, an integer (got {echo(max_tokens)})")
    if max_tokens < 1:
        raise InvalidArgument(f"max_tokens: must be at least 1, got {max_tokens}")
    in_range("temperature", number(fields, "temperature"), 0.0, 1.0)
    in_range("top_p", number(fields, "top_p"), 0.0, 1.0)
    top_k = number(fields, "top_k")
    if top_k is not None and top_k < 0:
        raise InvalidArgument(f"top_k: must be at least 0, got {top_k:g}")
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages: must be a list of at least one message")
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role: must be one of {', '.join(ROLES)}, got {echo(role)}")
        _blocks(message.get("content"), f"messages[{i}].content")
    if fields.get("system") is not None:
        _blocks(fields["system"], "system")
    stop = fields.get("stop_sequences")
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise InvalidArgument("stop_sequences: must be a list of strings")
    if isinstance(stop, list) and len(stop) > MAX_STOP:
        raise InvalidArgument(f"stop_sequences: at most {MAX_STOP} stop sequences, got {len(stop)}")


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text of its parts (OpenAI's) or blocks (Anthropic's)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str))
    return ""


def turns(fields: dict[str, Any]) -> list[tuple[str, str]]:
    """The conversation as (role, text) turns, Anthropic's system prompt first: what prefix affinity keys on.
    OpenAI's chat bodies read the same way (their system prompt is a message)."""
    system = [("system", text_of(fields.get("system")))] if fields.get("system") else []
    messages = fields.get("messages")
    listed = messages if isinstance(messages, list) else []
    return system + [(str(m.get("role", "")), text_of(m.get("content"))) for m in listed if isinstance(m, dict)]


def error_event(exc: BaseException) -> bytes:
    """An error after a stream began, as Anthropic sends it (the SDK raises on an error event)."""
    detail = exc if isinstance(exc, DomainError) else Internal("internal error while generating")
    body = anthropic_error_body(detail.http_status, bounded(str(detail)))
    return f"event: error\ndata: {json.dumps(body)}\n\n".encode()
