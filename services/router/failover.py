"""Routing one generation: the affinity key, the replica choice, and failover before the first token."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol, TypeVar

from prometheus_client import Counter

from meshserve.inference.v1 import inference_pb2
from services.router.accounting import Allowance
from services.router.admission import NO_REPLICA_RETRY_SECONDS
from services.router.balancer import Balancer, ReplicaState
from services.router.caller import RouteHints
from services.router.catalogue import Version
from services.router.validation import GenerationSpec
from services.runtime import tracing
from services.runtime.errors import LimitsUnavailable, Unavailable

log = logging.getLogger(__name__)

FAILOVERS = Counter(
    "meshserve_router_failovers_total",
    "Requests moved to another replica after one failed before the first token.",
    ["model"],
)


class Replica(Protocol):
    """An inference replica, as the router calls it."""

    address: str

    def generate(self, request: inference_pb2.GenerateRequest) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """Streams the engine's steps; raises DomainError for what went wrong. Closing it aborts the generation."""
        ...

    async def count_tokens(self, request: inference_pb2.GenerateRequest) -> tuple[int, int]:
        """(prompt tokens, the model's context length) for a request."""
        ...

    def serve(
        self,
        start: inference_pb2.ServeStart,
        reserve: Callable[[int, int], Awaitable[object]] | None,
        cover: Callable[[], Awaitable[tuple[int, int] | None]] | None = None,
        allowance: Allowance | None = None,
        whole: bool = False,
    ) -> AsyncGenerator[inference_pb2.ServeResponse, None]:
        """Streams an OpenAI request's replies; reserve (prompt tokens, most tokens) runs once the replica
        has measured the rendered prompt, before it generates (None: it generates at once). cover(), once
        done, is what tokens reserved on a guess cover (the most prompt and generated tokens): the replica
        then goes ahead on its own when its measurement falls within. allowance caps what it generates where
        spend budgets hold money for it, raised as it asks. whole: cover() is awaited before the call, so
        that its go-ahead goes with the start (a reply that is one body, whose reservation has landed).
        Closing it aborts the generation."""
        ...


S = TypeVar("S")
# One try of a generation on one replica: its steps (reserving tokens first where the caller has a budget).
Attempt = Callable[[Replica], AsyncGenerator[S, None]]


class ReplicaDirectory(Protocol):
    """The replicas the catalogue names, as states to balance over and clients to call."""

    def states(self, targets: Sequence[str]) -> list[ReplicaState]:
        """The state of every replica behind targets (host:port, or names that resolve to several)."""
        ...

    def replica(self, address: str) -> Replica:
        """The client of one replica."""
        ...


@dataclass(frozen=True)
class RoutingPolicy:
    """How requests are spread and retried."""

    # Prompts at least this long are routed by their first this-many characters (prefix affinity).
    prefix_chars: int = 512
    # Replicas tried for one request when they fail before the first token.
    failover_attempts: int = 3
    # A failed replica is out of rotation this long, doubling per failure in a row up to the maximum.
    eject_seconds: float = 1.0
    eject_max_seconds: float = 30.0


DEFAULT_POLICY = RoutingPolicy()


def opening(turns: Iterable[tuple[str, str]], prefix_chars: int) -> str:
    """A conversation's opening: only it matters, so joining stops once it is long enough."""
    parts: list[str] = []
    length = 0
    for role, content in turns:
        parts.append(f"{role}\n{content}\n")
        length += len(parts[-1])
        if length >= prefix_chars:
            break
    return "".join(parts)


def prefix_key(prompt: str, hints: RouteHints, prefix_chars: int) -> str | None:
    """A session's id, or the prompt's first prefix_chars characters; None for short prompts."""
    if hints.session:
        return f"session:{hints.session}"
    return prompt[:prefix_chars] if len(prompt) >= prefix_chars else None


def affinity_key(spec: GenerationSpec, hints: RouteHints, prefix_chars: int) -> str | None:
    """The affinity key of a typed (v1) request."""
    prompt = spec.text if spec.text is not None else opening(spec.turns, prefix_chars)
    return prefix_key(prompt, hints, prefix_chars)


class Backend(Replica, Protocol):
    """A backend tried in a fixed order (an external provider): a replica with its own routing state."""

    state: ReplicaState


class Failover:
    """The steps of one generation from a replica the balancer chose, moving on when one fails before its first step."""

    def __init__(self, replicas: ReplicaDirectory, balancer: Balancer, policy: RoutingPolicy) -> None:
        self._replicas = replicas
        self._balancer = balancer
        self._policy = policy

    async def steps(
        self, attempt: Attempt[S], request_id: str, model: str, version: Version, key: str | None
    ) -> AsyncGenerator[S, None]:
        """The steps of one replica; a replica that fails before its first step is ejected and another tried."""
        tried: list[str] = []
        last_error: Unavailable | None = None
        while True:
            with tracing.span("router.choose_replica") as choice:
                state = self._balancer.choose(
                    version.serving(self._replicas.states(version.replicas)), key, tried, version.pool_weights
                )
                choice.set_attribute("meshserve.attempt", len(tried) + 1)
                choice.set_attribute("meshserve.replica", state.address if state is not None else "")
            if state is None:
                failed = f"; {len(tried)} failed, the last with: {last_error}" if tried else ""
                raise Unavailable(
                    f"no replica of {model} version {version.name} is in rotation{failed}",
                    retry_after_seconds=NO_REPLICA_RETRY_SECONDS,
                )
            try:
                async with aclosing(self._on(state, self._replicas.replica(state.address), attempt)) as stream:
                    async for step in stream:
                        yield step
                return
            except _FailedFirst as failed:
                tried.append(state.address)
                last_error = self._failed(failed.error, state, request_id, model)
                if len(tried) >= self._policy.failover_attempts:
                    raise failed.error from None

    async def ordered(
        self, attempt: Attempt[S], request_id: str, model: str, backends: Sequence[Backend]
    ) -> AsyncGenerator[S, None]:
        """The steps of the first backend in rotation that does not fail before its first step (in order:
        the catalogue's order of a model's providers); one that does is ejected and the next tried."""
        errors: list[str] = []
        for backend in backends:
            if not backend.state.available:
                continue
            try:
                async with aclosing(self._on(backend.state, backend, attempt)) as stream:
                    async for step in stream:
                        yield step
                return
            except _FailedFirst as failed:
                errors.append(str(self._failed(failed.error, backend.state, request_id, model)))
        tried = f": {'; '.join(errors)}" if errors else ": every one is out of rotation after failures"
        retry = NO_REPLICA_RETRY_SECONDS
        raise Unavailable(f"no provider backend of {model} answered{tried}", retry_after_seconds=retry)

    async def _on(self, state: ReplicaState, replica: Replica, attempt: Attempt[S]) -> AsyncGenerator[S, None]:
        """One try on one replica; Unavailable before its first step comes out as _FailedFirst, unless it is the
        request's own limits that cannot be checked (the replica is not at fault: nothing is ejected or retried)."""
        state.in_flight += 1
        started = False
        try:
            async with aclosing(attempt(replica)) as stream:
                async for step in stream:
                    started = True
                    yield step
            state.succeeded()
        except Unavailable as exc:
            if started or isinstance(exc, LimitsUnavailable):
                raise
            raise _FailedFirst(exc) from exc
        finally:
            state.in_flight -= 1

    def _failed(self, error: Unavailable, state: ReplicaState, request_id: str, model: str) -> Unavailable:
        state.eject(self._policy.eject_seconds, self._policy.eject_max_seconds)
        FAILOVERS.labels(model).inc()
        log.warning(
            "replica failed before the first token; ejected",
            extra={"request_id": request_id, "replica": state.address, "error": str(error)},
        )
        return error


class _FailedFirst(Exception):
    """A try that failed before its first step (the next is tried)."""

    def __init__(self, error: Unavailable) -> None:
        super().__init__(str(error))
        self.error = error
