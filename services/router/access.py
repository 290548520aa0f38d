"""One access log line per request at the router: model, tenant, tokens, outcome, status and latency.

The servicer opens an Access for each call; the generation fills in what it used (through a context
variable, since it runs in the call's task). Imports no gRPC."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

log = logging.getLogger("services.router.access")


@dataclass
class Access:
    """What one call did, as its access log line says it."""

    method: str
    model: str = ""
    tenant: str = ""
    version: str = ""
    # How the generation ended (completed, cancelled, failed); empty when none began.
    outcome: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float = 0.0
    # The call's status code name; set by whoever maps errors to codes.
    status: str = "OK"
    started: float = field(default_factory=time.perf_counter)


CURRENT: ContextVar[Access | None] = ContextVar("meshserve_router_access", default=None)


@contextmanager
def opened(method: str, status_of: Callable[[BaseException], str]) -> Iterator[Access]:
    """The call's Access, current while the call runs; its line is logged when the call ends, however it ends.

    status_of names the status code a call ending with that exception has."""
    entry = Access(method)
    token = CURRENT.set(entry)
    try:
        yield entry
    except BaseException as exc:
        entry.status = status_of(exc)
        raise
    finally:
        # A stream closed from another context (garbage collection) cannot reset the variable; nothing reads it then.
        with contextlib.suppress(ValueError):
            CURRENT.reset(token)
        log.info(
            "access",
            extra={
                "method": entry.method,
                "model": entry.model,
                "tenant": entry.tenant,
                "version": entry.version,
                "status": entry.status,
                "outcome": entry.outcome,
                "prompt_tokens": entry.prompt_tokens,
                "completion_tokens": entry.completion_tokens,
                "ttft_ms": round(entry.ttft_ms, 2),
                "latency_ms": round((time.perf_counter() - entry.started) * 1000, 2),
            },
        )
