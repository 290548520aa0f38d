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

    # The HTTP status a REST client gets: the edge's mapping of the error's gRPC status (Envoy's
    # grpc-to-HTTP table), so an error reported in-band in a stream reads as it would have before it;
    # its OpenAI type and code come from the one table in openai_errors.
    http_status = 500
    # OpenAI's error type and code where they are not the status's own (openai_errors.ERROR_TYPES).
    error_type: str | None = None

    def __init__(self, message: str, retry_after_seconds: float | None = None) -> None:
        super().__init__(bounded(message))
        # When the caller may try again (a Retry-After header on REST, a retry-after trailer on gRPC).
        self.retry_after_seconds = retry_after_seconds


class InvalidArgument(DomainError):
    """The request is malformed; the message names the field and why."""

    http_status = 400


class NotFound(DomainError):
    """The named thing (a model, a key) does not exist."""

    http_status = 404


class ResourceExhausted(DomainError):
    """A limit or a queue is full; the caller may retry later."""

    http_status = 429


class QuotaExceeded(ResourceExhausted):
    """A spend budget has no room for the request: OpenAI's insufficient_quota (no retry helps before the
    budget's period starts again)."""

    error_type = "insufficient_quota"


class Unavailable(DomainError):
    """A dependency (an engine replica, Redis) cannot be reached right now."""

    http_status = 503


class LimitsUnavailable(Unavailable):
    """A request's limits cannot be checked right now (Redis or the rate-limit service away, and the rules fail
    closed): the request is refused as Unavailable, and no engine replica is at fault (none is ejected)."""


class FailedPrecondition(DomainError):
    """The service is not in a state to do this (e.g. the model is not loaded)."""

    http_status = 400


class Unauthenticated(DomainError):
    """No usable credential: missing, malformed, unknown, expired or revoked."""

    http_status = 401


class PermissionDenied(DomainError):
    """A valid credential that may not do this."""

    http_status = 403


class DeadlineExceeded(DomainError):
    """A call ran out of its time; says nothing about the health of whoever was called."""

    http_status = 504


class Internal(DomainError):
    """A fault on the server's side that is not the caller's and not a dependency being away."""

    http_status = 500
