"""Error shapes: OpenAI's `type` and `code` (and Anthropic's `type`) per HTTP status, for every error body sent."""

from __future__ import annotations

# HTTP status -> (OpenAI error type, short code).
ERROR_TYPES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    409: ("conflict_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    431: ("invalid_request_error", "request_headers_too_large"),
    499: ("server_error", "cancelled"),
    500: ("server_error", "internal_error"),
    501: ("invalid_request_error", "not_implemented"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}


# The header (gRPC trailing metadata) that names an error's OpenAI type where it is not its status's own;
# the edge writes it into the body as type and code.
ERROR_TYPE_HEADER = "x-meshserve-error-type"


def error_body(status: int, message: str, error_type: str | None = None) -> dict[str, dict[str, object]]:
    """OpenAI's error object for an HTTP status (or a type of its own), as the edge writes it for every error."""
    kind, code = ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    if error_type is not None:
        kind = code = error_type
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


# Anthropic's error types by HTTP status, for the Messages route (its SDK reads error.type).
ANTHROPIC_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_body(status: int, message: str) -> dict[str, object]:
    """Anthropic's error object for an HTTP status, as the edge writes it on the Messages route."""
    kind = ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}
