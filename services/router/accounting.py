"""What a generation used, settled and recorded off its path: the token reservation and the usage record."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshserve.billing.v1 import billing_pb2
from meshserve.inference.v1 import inference_pb2
from services.router import access, metrics
from services.router.caller import Caller
from services.router.catalogue import Version
from services.runtime import tracing


@dataclass(frozen=True)
class Window:
    """The caller's tightest window of a kind (requests, tokens) after a request, as OpenAI's x-ratelimit-*
    headers say it."""

    kind: str
    limit: int
    remaining: int
    reset_seconds: float

    def headers(self) -> tuple[tuple[str, str], ...]:
        reset = f"{self.reset_seconds:.3f}".rstrip("0").rstrip(".") + "s"
        return (
            (f"x-ratelimit-limit-{self.kind}", str(self.limit)),
            (f"x-ratelimit-remaining-{self.kind}", str(self.remaining)),
            (f"x-ratelimit-reset-{self.kind}", reset),
        )


# What a reservation does with its tokens: hold them or refuse; hold them if they fit (a guess made before
# the prompt was measured); hold nothing (the call only counts the request).
HOLD_REQUIRED, HOLD_IF_ROOM, HOLD_NONE = "required", "if_room", "none"


@dataclass(frozen=True)
class Reserved:
    """What a reservation did: whether the counts it was given need no further reservation (held, or no
    limit enforced), and the windows it left."""

    covers: bool
    windows: tuple[Window, ...] = ()
    # Tokens are held: the reservation is to be settled.
    held: bool = False
    # Money is held in spend budgets for this many completion tokens (over every choice); None: no cap.
    allowance: int | None = None


class TokenBudget(Protocol):
    """Request and token limits: count the request and reserve its tokens before generating, settle after."""

    async def reserve(
        self,
        request_id: str,
        caller: Caller,
        model: str,
        prompt_tokens: int,
        max_tokens: int,
        count_request: bool = False,
        hold: str = HOLD_REQUIRED,
    ) -> Reserved:
        """Counts the request when asked and holds the tokens as hold says; raises ResourceExhausted when a
        request limit is reached, or when required tokens do not fit."""
        ...

    def settle(
        self, request_id: str, caller: Caller, model: str, prompt_tokens: int, completion_tokens: int, outcome: str
    ) -> None:
        """Settles in the background (outcome: completed, cancelled or failed); never raises."""
        ...

    async def extend(self, request_id: str, caller: Caller, model: str, more_tokens: int) -> int | None:
        """Holds money for up to more_tokens further completion tokens of a request capped by its spend
        budgets: the completion tokens it may now generate (no more than before where no budget had room),
        None where it is not capped."""
        ...


class UsageSink(Protocol):
    """Where usage records go (billing), off the request's path."""

    def record(self, record: billing_pb2.UsageRecord) -> None:
        """Queues one record; never blocks and never raises."""
        ...


USAGE_OUTCOMES = {
    "completed": billing_pb2.OUTCOME_COMPLETED,
    "cancelled": billing_pb2.OUTCOME_CANCELLED,
    "failed": billing_pb2.OUTCOME_FAILED,
    "cached": billing_pb2.OUTCOME_CACHED,
}


# Fewest completion tokens a stream asks its spend budgets for at a time (it asks for as many as it holds).
EXTEND_AT_LEAST = 16
# What a replica is told when a request is no longer capped (its budgets failed open).
UNCAPPED = 2**32 - 1


@dataclass
class Allowance:
    """The completion tokens (over every choice) that money held in spend budgets pays for, None where no
    budget caps the request; raised as a stream goes, and whether the request was stopped at it."""

    tokens: int | None = None
    extend: Callable[[int], Awaitable[int | None]] | None = None
    stopped: bool = False

    async def raise_for(self, sent: int, max_tokens: int) -> int:
        """More room for a request that has sent `sent` tokens and may generate max_tokens: the new
        allowance, no more than before where no budget had room."""
        current = self.tokens or 0
        if self.extend is None:
            return current
        more = max(EXTEND_AT_LEAST, current)
        if max_tokens > sent:
            more = min(more, max_tokens - current)
        self.tokens = await self.extend(max(1, more))
        return UNCAPPED if self.tokens is None else self.tokens


@dataclass
class Metered:
    """What one generation used: for settling its token reservation and for its usage record."""

    started: float
    # Whether the caller has a token budget to reserve from (internal callers have none).
    budgeted: bool
    prompt_tokens: int = 0
    # Tokens are held for it (settled at the end), and the hold was checked against the measured prompt.
    reserved: bool = False
    covered: bool = False
    # The first reservation, sent as the request came in: it counts the request against its request limits
    # and holds the guessed tokens if any (estimates.Hold), while the replica renders the prompt.
    early: asyncio.Task[Any] | None = None
    last: inference_pb2.GenerateResponse | inference_pb2.ServeResponse | None = None
    outcome: str = "cancelled"
    admitted: float = 0.0
    first_token: float = 0.0
    # A whole reply (not a stream): the client receives its tokens only if it completes.
    unary: bool = False
    allowance: Allowance = field(default_factory=Allowance)
    # The backend that took it (local, or a provider's name) and why (local, only, fallback, overflow).
    backend: str = "local"
    use: str = "local"


class Accounting:
    """Settles each generation's reservation and records its usage, both in the background."""

    def __init__(self, budget: TokenBudget | None, usage: UsageSink | None, clock: Callable[[], float]) -> None:
        self._budget = budget
        self._usage = usage
        self._clock = clock

    def account(self, request_id: str, model: str, caller: Caller, version: Version, metered: Metered) -> None:
        """Settles the reservation and records the usage of a generation, in the background."""
        last = metered.last
        prompt_tokens = last.prompt_tokens if last is not None else metered.prompt_tokens
        completion_tokens = last.completion_tokens if last is not None else 0
        budget = self._budget

        def settle() -> None:
            if metered.reserved and budget is not None:
                budget.settle(request_id, caller, model, prompt_tokens, completion_tokens, metered.outcome)

        if metered.early is not None and not metered.early.done():
            metered.early.add_done_callback(lambda _: settle())  # ended while its early reservation was on its way
        else:
            settle()
        tenant = caller.tenant or "internal"
        if metered.allowance.stopped:
            metrics.STOPPED_AT_BUDGET.labels(model).inc()
        metrics.finished(model, version.name, tenant, metered.outcome, prompt_tokens, completion_tokens)
        metrics.BACKENDS.labels(model, metered.backend, metered.use).inc()
        _note_access(version, metered, prompt_tokens, completion_tokens)
        # A request the engine reported on was generated for, and is billed for what its client received:
        # a stream's tokens as they went out, whatever its outcome; a whole reply's only if it was sent.
        # Tokens nobody received are recorded as written off, never silently dropped.
        if last is not None:
            received = 0 if metered.unary and metered.outcome == "failed" else completion_tokens
            self._record(request_id, model, caller, version, metered, prompt_tokens, received, completion_tokens)

    def cached(
        self,
        request_id: str,
        model: str,
        caller: Caller,
        version: Version,
        metered: Metered,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        """Records a request answered from the response cache: the tokens its answer reports, outcome cached
        (billing keeps them apart from generated tokens, at the cache's price)."""
        metered.outcome = "cached"
        metrics.REQUESTS.labels(model, version.name, metered.outcome).inc()
        _note_access(version, metered, prompt_tokens, completion_tokens)
        self._record(request_id, model, caller, version, metered, prompt_tokens, completion_tokens, completion_tokens)

    def _record(
        self,
        request_id: str,
        model: str,
        caller: Caller,
        version: Version,
        metered: Metered,
        prompt_tokens: int,
        received: int,
        completion_tokens: int,
    ) -> None:
        if self._usage is None:
            return
        ended = time.monotonic()
        first_token = metered.first_token - metered.started if metered.first_token else 0.0
        record = billing_pb2.UsageRecord(
            request_id=request_id,
            tenant=caller.tenant or "internal",
            key_id=caller.key_id,
            model=billed_as(model, metered.backend),
            version=version.name,
            prompt_tokens=prompt_tokens,
            completion_tokens=received,
            written_off_tokens=completion_tokens - received,
            outcome=USAGE_OUTCOMES[metered.outcome],
            queue_seconds=max(0.0, metered.admitted - metered.started),
            ttft_seconds=first_token,
            total_seconds=ended - metered.started,
            traceparent=tracing.traceparent(),
        )
        record.finished_at.FromNanoseconds(int(self._clock() * 1e9))
        self._usage.record(record)


def billed_as(model: str, backend: str) -> str:
    """The name usage is metered and priced under: the model's own for its replicas' answers, model@provider for
    a provider's (their own ledger rows and usage lines, priced by that name's entry in the price table, and
    outside the drift rule: no engine of the mesh generated them)."""
    return model if backend == "local" else f"{model}@{backend}"


def _note_access(version: Version, metered: Metered, prompt_tokens: int, completion_tokens: int) -> None:
    """What the request's access log line says of its generation."""
    entry = access.CURRENT.get()
    if entry is not None:
        entry.version, entry.outcome = version.name, metered.outcome
        entry.prompt_tokens, entry.completion_tokens = prompt_tokens, completion_tokens
        entry.ttft_ms = (metered.first_token - metered.started) * 1000 if metered.first_token else 0.0
