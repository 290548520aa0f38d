"""The edge's own replies: OpenAI-shaped error bodies for REST, a status that says why for gRPC; its access log."""

from __future__ import annotations

from typing import Any

from deploy.envoy.settings import EdgeConfig
from services.runtime.identity import MODEL_HEADER, TENANT_HEADER
from services.runtime.openai_errors import ANTHROPIC_TYPES, ERROR_TYPES, anthropic_error_body, error_body


def _error_body(status: int) -> dict[str, Any]:
    return {"json_format": error_body(status, "%LOCAL_REPLY_BODY%")}


# Anthropic's Messages route (and its :stream binding) answers errors in Anthropic's shape.
MESSAGES_PATH = "/v1/messages"


def _anthropic_mappers() -> list[dict[str, Any]]:
    on_messages = {"header_filter": {"header": {"name": ":path", "string_match": {"prefix": MESSAGES_PATH}}}}

    def body(status: int) -> dict[str, Any]:
        return {"json_format": anthropic_error_body(status, "%LOCAL_REPLY_BODY%")}

    statuses = sorted(set(ERROR_TYPES) | set(ANTHROPIC_TYPES))
    by_status = [
        {"filter": {"and_filter": {"filters": [on_messages, _status_is(status)]}}, "body_format_override": body(status)}
        for status in statuses
    ]
    return [*by_status, {"filter": on_messages, "body_format_override": body(500)}]


def _grpc_local_status(cfg: EdgeConfig) -> dict[int, tuple[int, str]]:
    """gRPC status and message of the edge's own replies to native gRPC clients, where Envoy's default
    (from the HTTP status) would be UNKNOWN: a message or a header block over the edge's limit."""
    return {
        413: (8, f"the request is larger than the edge accepts ({cfg.max_request_bytes} bytes)"),
        431: (8, f"the request headers are larger than the edge accepts ({cfg.max_request_headers_kb} KiB)"),
    }


def _status_is(status: int) -> dict[str, Any]:
    value = {"default_value": status, "runtime_key": f"meshserve.local_reply.{status}"}
    return {"status_code_filter": {"comparison": {"op": "EQ", "value": value}}}


def _grpc_mappers(cfg: EdgeConfig) -> list[dict[str, Any]]:
    """gRPC clients get the message as plain text (it becomes grpc-message) and a status that says why."""
    is_grpc = {"header_filter": {"header": {"name": "content-type", "string_match": {"prefix": "application/grpc"}}}}
    plain = {"text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"}}

    def header(key: str, value: str) -> dict[str, Any]:
        return {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}

    # A trailers-only reply written whole: HTTP 200, the status and message as headers, no body.
    by_status = [
        {
            "filter": {"and_filter": {"filters": [is_grpc, _status_is(status)]}},
            "status_code": 200,
            "headers_to_add": [
                header("content-type", "application/grpc"),
                header("grpc-status", str(grpc)),
                header("grpc-message", message),
            ],
            "body_format_override": {"text_format_source": {"inline_string": ""}},
        }
        for status, (grpc, message) in _grpc_local_status(cfg).items()
    ]
    return [*by_status, {"filter": is_grpc, "body_format_override": plain}]


def local_reply_config(cfg: EdgeConfig) -> dict[str, Any]:
    mappers = (
        _grpc_mappers(cfg)
        + _anthropic_mappers()
        + [{"filter": _status_is(status), "body_format_override": _error_body(status)} for status in ERROR_TYPES]
    )
    return {"mappers": mappers, "body_format": _error_body(500)}


def access_log() -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.access_loggers.stdout",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                "log_format": {
                    "json_format": {
                        "ts": "%START_TIME%",
                        "service": "edge",
                        "msg": "access",
                        "request_id": "%REQ(X-REQUEST-ID)%",
                        "trace_id": "%TRACE_ID%",
                        "method": "%REQ(:METHOD)%",
                        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
                        "protocol": "%PROTOCOL%",
                        "status": "%RESPONSE_CODE%",
                        "grpc_status": "%GRPC_STATUS%",
                        "model": f"%REQ({MODEL_HEADER})%",
                        "tenant": f"%REQ({TENANT_HEADER})%",
                        "duration_ms": "%DURATION%",
                        "upstream_ms": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
                        "bytes_in": "%BYTES_RECEIVED%",
                        "bytes_out": "%BYTES_SENT%",
                    }
                },
            },
        }
    ]
