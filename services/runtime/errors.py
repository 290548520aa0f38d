"""Domain errors: raised by modules that import no gRPC, mapped to status codes at the edge of a servicer."""

from __future__ import annotations

# Longest message an error carries. Messages travel as gRPC's grpc-message header, and one over the
# HTTP/2 header limit of a proxy (Envoy) resets the whole connection, cutting every stream on it.
MAX_MESSAGE_CHARS = 1024
# Longest client value quoted back in a message.
MAX_ECHO_CHARS = 64


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """message, cut to at most limit characters (saying how much was cut)."""
    if len(message) <= limit:
        return message
    cut = f"… ({len(message) - limit} more characters)"
    return message[: max(0, limit - len(cut))] + cut


def echo(value: object) -> str:
    """A client's value quoted in an error message: repr(), at most MAX_ECHO_CHARS characters of it."""
    return bounded(repr(value), MAX_ECHO_CHARS)


class DomainError(Exception):
    """Base of every error a caller should see with its own status."""

    # Short machine-readable code, shown to clients (OpenAI's error `code`).
    code = "internal_error"

    def __init__(self, message: str, retry_after_seconds: float | None = None) -> None:
        super().__init__(bounded(message))
        # When the caller may try again (a Retry-After header on REST, a retry-after trailer on gRPC).
        self.retry_after_seconds = retry_after_seconds


class InvalidArgument(DomainError):
    """The request is malformed; the message names the field and why."""

    code = "invalid_request"


class NotFound(DomainError):
    """The named thing (a model, a key) does not exist."""

    code = "not_found"


class ResourceExhausted(DomainError):
    """A limit or a queue is full; the caller may retry later."""

    code = "resource_exhausted"


class Unavailable(DomainError):
    """A dependency (an engine replica, Redis) cannot be reached right now."""

    code = "unavailable"


class FailedPrecondition(DomainError):
    """The service is not in a state to do this (e.g. the model is not loaded)."""

    code = "failed_precondition"


class Unauthenticated(DomainError):
    """No usable credential: missing, malformed, unknown, expired or revoked."""

    code = "invalid_api_key"


class PermissionDenied(DomainError):
    """A valid credential that may not do this."""

    code = "permission_denied"


class DeadlineExceeded(DomainError):
    """A call ran out of its time; says nothing about the health of whoever was called."""

    code = "timeout"


class Internal(DomainError):
    """A fault on the server's side that is not the caller's and not a dependency being away."""

    code = "internal_error"
