"""One generation, whatever the endpoint: admission, the replica and failover, timing, and accounting after."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import TypeVar, cast

from opentelemetry import trace

from meshserve.inference.v1 import inference_pb2
from services.router import metrics
from services.router.accounting import HOLD_IF_ROOM, HOLD_NONE, Accounting, Metered, TokenBudget, UsageSink, Window
from services.router.admission import Admission
from services.router.balancer import Balancer, LoadReport
from services.router.caller import Caller, RouteHints
from services.router.catalogue import Catalogue, ModelEntry, ProviderRoute, Version
from services.router.estimates import Guess, Hold
from services.router.failover import Attempt, Failover, Replica, ReplicaDirectory, RoutingPolicy
from services.router.providers import Providers, backend_of
from services.runtime import genai, tracing
from services.runtime.errors import DomainError, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

FINISHED = (inference_pb2.FINISH_REASON_STOP, inference_pb2.FINISH_REASON_LENGTH)
# The GenAI semantic conventions' operation names of what the router generates.


S = TypeVar("S", inference_pb2.GenerateResponse, inference_pb2.ServeResponse)
# Builds one request's attempt on a replica from what it is metered by and the version chosen.
AttemptFactory = Callable[[Metered, Version], Attempt[S]]
# Reserves tokens for a measured prompt (prompt tokens, the most it may generate): the tightest windows after.
Reserve = Callable[[int, int], Awaitable[tuple[Window, ...]]]
# The most (key, model) pairs whose last refusal by a request limit the router remembers.
REFUSALS_KEPT = 10_000
# The admission lane of a model's provider backends (a version's lane is its name).
PROVIDERS_LANE = "providers"


class Pipeline:
    """Admission, the replica choice with failover, timing and accounting: the same for every endpoint."""

    def __init__(
        self,
        catalogue: Callable[[], Catalogue],
        replicas: ReplicaDirectory,
        budget: TokenBudget | None,
        usage: UsageSink | None,
        clock: Callable[[], float],
        rng: random.Random,
        balancer: Balancer,
        admission: Admission,
        policy: RoutingPolicy,
        providers: Providers | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.providers = providers or Providers(lambda: catalogue().providers)
        self.replicas = replicas
        self.budget = budget
        self.policy = policy
        self._rng = rng
        self._admission = admission
        self._failover = Failover(replicas, balancer, policy)
        self._accounting = Accounting(budget, usage, clock)
        # (key id, model) -> (monotonic time until which its request limit is reached, the refusal's reason)
        self._refused: dict[tuple[str, str], tuple[float, str]] = {}

    def capacity(self, version: Version) -> int:
        """Requests the version's replicas in rotation can generate for at once."""
        return sum(s.capacity for s in version.serving(self.replicas.states(version.replicas)) if s.available)

    def replicas_changed(self) -> None:
        """Lets queued requests in when replicas come into rotation."""
        for entry in self.catalogue().entries():
            for version in entry.versions:
                self._admission.wake((entry.id, version.name), functools.partial(self.capacity, version))

    def unready_models(self) -> list[str]:
        """Models the router must not report ready without: required, and no replica of theirs in rotation."""
        return [
            e.id
            for e in self.catalogue().entries()
            if e.required_for_ready
            and e.targets()  # a model served by providers only has no replica to wait for
            and not any(s.available for v in e.versions for s in v.serving(self.replicas.states(v.replicas)))
        ]

    def report_of(self, entry: ModelEntry) -> LoadReport | None:
        """What a replica of entry in rotation last reported (of its most weighted version first), if any."""
        for version in sorted(entry.versions, key=lambda v: -v.weight):
            for state in version.serving(self.replicas.states(version.replicas)):
                if state.available and state.report is not None:
                    return state.report
        return None

    async def generate(
        self,
        request_id: str,
        model: str,
        key: str | None,
        caller: Caller,
        hints: RouteHints,
        attempt: AttemptFactory[S],
        unary: bool = False,
        guess: Guess | None = None,
        operation: str = genai.CHAT,
    ) -> AsyncGenerator[S, None]:
        """The steps of one generation, from admission to accounting (which runs however it ends).

        operation is the OpenTelemetry GenAI operation (CHAT or TEXT_COMPLETION): the generation's span is
        named and described by those conventions, as tracing backends group LLM calls, beside meshserve's own."""
        # Internal callers (no tenant) have no limits.
        metered = Metered(
            started=time.monotonic(), budgeted=self.budget is not None and bool(caller.tenant), unary=unary
        )
        if self.budget is not None and metered.budgeted:
            metered.allowance.extend = functools.partial(self.budget.extend, request_id, caller, model)
        self.count(request_id, caller, model, metered, guess)
        if metered.early is not None:
            await asyncio.sleep(0)  # the count goes out first: it is what the engine's go-ahead waits for
        try:
            entry, version = self.route(model, caller, hints)
        except DomainError:
            await self._counted(metered)  # a request over its limit hears that first, as from the edge before
            raise
        # A model without providers (the common case) costs the hot path nothing more.
        routes, use = self._external(entry, version, caller) if entry.providers else ((), "local")
        fallback = entry.routes("fallback") if entry.providers and not routes else ()
        timer = metrics.GenerationTimer(model, metered.started)
        attributes = {"meshserve.model": model, "meshserve.version": version.name, "meshserve.tenant": caller.tenant}
        queued = tracing.start_span("router.queue_wait", attributes)
        first = True
        try:
            # Provider backends have a lane of their own, as many slots as they take requests at once.
            lane = (model, PROVIDERS_LANE if routes else version.name)
            capacity = functools.partial(self._provider_capacity, routes) if routes else lambda: self.capacity(version)
            # A request over its limit never waits in the queue: it is counted before it joins it.
            async with self._admission.slot(lane, capacity, lambda: self._counted(metered)):
                queued.end()
                metered.admitted = time.monotonic()
                timer.admitted(metered.admitted)
                # Current while the replica is called: the engine's spans and billing's record join it.
                described = {**attributes, "meshserve.request_id": request_id}
                described |= genai.request_attributes(operation, model, request_id)
                with tracing.span(genai.span_name(operation, model), described) as span:
                    try:
                        # aclosing: a consumer that stops early closes the replica's stream (aborts the engine) now.
                        tries = _tracked(attempt(metered, version), metered)
                        metered.use = use
                        if routes:
                            backends = [self.providers.backend(r) for r in routes]
                            replica_steps = self._failover.ordered(tries, request_id, model, backends)
                        else:
                            replica_steps = self._failover.steps(tries, request_id, model, version, key)
                        if fallback:
                            replica_steps = self._falling_back(replica_steps, tries, request_id, metered, fallback)
                        steps = _timed(replica_steps, metered, timer, span)
                        async with aclosing(steps):
                            async for step in steps:
                                first = False
                                yield step
                    finally:
                        # Runs however the stream ends: finished, failed, or closed early by a client gone away.
                        span.set_attribute("meshserve.outcome", metered.outcome)
                        span.set_attribute("meshserve.backend", metered.backend)
                        _gen_ai_usage(span, metered)
                        self._accounting.account(request_id, model, caller, version, metered)
        except DomainError:
            if first:
                await self._counted(metered)
            raise
        finally:
            if queued.is_recording():
                queued.end()

    def _external(self, entry: ModelEntry, version: Version, caller: Caller) -> tuple[tuple[ProviderRoute, ...], str]:
        """The provider backends a request goes to instead of the local replicas (none: it stays local), and why:
        the model has no replicas (only), none is in rotation (fallback), or its tenant may overflow and the
        local queue's expected wait passes the model's threshold (overflow)."""
        if only := entry.routes("only"):
            return only, "only"
        capacity = self.capacity(version)
        if (fallback := entry.routes("fallback")) and capacity == 0:
            return fallback, "fallback"
        overflow = entry.routes("overflow")
        if overflow and caller.tenant in entry.overflow_tenants:
            if self._admission.expected_wait((entry.id, version.name), capacity) > entry.overflow_wait_seconds:
                return overflow, "overflow"
        return (), "local"

    def _provider_capacity(self, routes: tuple[ProviderRoute, ...]) -> int:
        """Requests the providers of routes take at once (those in rotation)."""
        states = [self.providers.backend(r).state for r in routes]
        return sum(s.capacity for s in states if s.available) or (1 if states else 0)

    async def _falling_back(
        self,
        local: AsyncGenerator[S, None],
        tries: Attempt[S],
        request_id: str,
        metered: Metered,
        routes: tuple[ProviderRoute, ...],
    ) -> AsyncGenerator[S, None]:
        """The local replicas' steps; where every one tried failed before its first step, the fallback
        providers' (the request keeps the local lane's slot: it was admitted there)."""
        started = False
        try:
            async with aclosing(local) as steps:
                async for step in steps:
                    started = True
                    yield step
            return
        except Unavailable as exc:
            if started:
                raise
            log.warning("every local replica failed: the fallback providers answer", extra={"error": str(exc)})
        metered.use = "fallback"
        backends = [self.providers.backend(r) for r in routes]
        async with aclosing(self._failover.ordered(tries, request_id, routes[0].model, backends)) as steps:
            async for step in steps:
                yield step

    def route(self, model: str, caller: Caller, hints: RouteHints) -> tuple[ModelEntry, Version]:
        """The model's entry and the version a request goes to (pinned, or drawn by weight)."""
        # Permission before existence: a key learns nothing about models it may not use.
        caller.require(model)
        entry = self.catalogue().get(model)
        return entry, entry.version(hints.version) if hints.version else entry.pick(self._rng)

    async def cached(
        self, request_id: str, model: str, caller: Caller, version: Version, prompt_tokens: int, completion_tokens: int
    ) -> tuple[Window, ...]:
        """A request answered from the response cache: counted against its request limits (ResourceExhausted
        where one is reached; no tokens are held, no engine works) and recorded with outcome cached. The
        windows its count left."""
        metered = Metered(started=time.monotonic(), budgeted=self.budget is not None and bool(caller.tenant))
        self.count(request_id, caller, model, metered, None)
        await self._counted(metered)
        self._accounting.cached(request_id, model, caller, version, metered, prompt_tokens, completion_tokens)
        counted = metered.early.result() if metered.early is not None else None
        return cast(tuple[Window, ...], counted.reserved.windows) if counted is not None else ()

    def count(self, request_id: str, caller: Caller, model: str, metered: Metered, guess: Guess | None) -> None:
        """Sends the first reservation, which counts the request against its request limits and holds the
        guessed tokens if any, without waiting for it: it is awaited before the queue, an error, or the
        engine's go-ahead. A key and model refused by a request limit are refused here until it frees."""
        budget = self.budget
        if budget is None or not metered.budgeted:
            return
        now = time.monotonic()
        refused = self._refused.get((caller.key_id, model))
        if refused is not None:
            until, reason = refused
            if now < until:
                raise ResourceExhausted(f"{reason}; retry after {until - now:.1f} s", retry_after_seconds=until - now)
            del self._refused[(caller.key_id, model)]
        metered.early = asyncio.ensure_future(self._first(budget, request_id, caller, model, metered, guess))
        # Retrieved here, whoever awaits it (a request that ended first leaves nobody to).
        metered.early.add_done_callback(lambda early: early.cancelled() or early.exception())

    async def _first(
        self, budget: TokenBudget, request_id: str, caller: Caller, model: str, metered: Metered, guess: Guess | None
    ) -> Hold:
        """Counts the request and holds the guess if it fits (the measured counts decide when it does not);
        a refusal is remembered for the key and model until its retry time."""
        counts = (guess.prompt_tokens, guess.max_tokens) if guess is not None else (0, 0)
        hold = HOLD_IF_ROOM if guess is not None else HOLD_NONE
        try:
            reserved = await budget.reserve(request_id, caller, model, *counts, count_request=True, hold=hold)
        except ResourceExhausted as exc:
            if exc.retry_after_seconds is not None:
                now = time.monotonic()
                if len(self._refused) >= REFUSALS_KEPT:
                    self._refused = {k: v for k, v in self._refused.items() if v[0] > now}
                reason = str(exc).rsplit("; retry after", 1)[0]
                self._refused[(caller.key_id, model)] = (now + exc.retry_after_seconds, reason)
            raise
        metered.reserved = metered.reserved or reserved.held
        return Hold(guess, reserved)

    @staticmethod
    async def _counted(metered: Metered) -> None:
        """Waits for the request to be counted; raises its refusal (a request limit reached) if it was refused."""
        if metered.early is not None:
            # Shielded: a request that stops waiting must not cancel the reservation, which is settled once it lands.
            await asyncio.shield(metered.early)

    def reserver(self, request_id: str, caller: Caller, model: str, metered: Metered) -> Reserve | None:
        """What reserves tokens for a measured prompt, or None where nothing is to be reserved (any more).

        The first reservation counted the request and held a guess, if there was one, while the replica
        rendered the prompt; the measured counts need no second call when it covers them (estimates.py)."""
        budget = self.budget
        if budget is None or not metered.budgeted or metered.covered:
            return None

        async def reserve(prompt_tokens: int, max_tokens: int) -> tuple[Window, ...]:
            held = await asyncio.shield(metered.early) if metered.early is not None else None
            if held is not None and held.covers(prompt_tokens, max_tokens):
                metered.prompt_tokens, metered.covered = prompt_tokens, True
                metered.allowance.tokens = held.reserved.allowance
                return cast(tuple[Window, ...], held.reserved.windows)
            # No guess, or one too small: the measured counts, in place of whatever the guess holds.
            reserved = await budget.reserve(request_id, caller, model, prompt_tokens, max_tokens)
            metered.prompt_tokens, metered.reserved, metered.covered = prompt_tokens, True, True
            metered.allowance.tokens = reserved.allowance
            counted = tuple(w for w in held.reserved.windows if w.kind == "requests") if held is not None else ()
            return counted + reserved.windows

        return reserve

    @staticmethod
    def landed(metered: Metered) -> bool:
        """Whether the request's first reservation has its answer (or there is none to wait for)."""
        return metered.early is None or metered.early.done()

    @staticmethod
    async def covered(metered: Metered) -> tuple[int, int] | None:
        """What tokens reserved on a guess cover once they hold (prompt tokens, most generated), or None."""
        held = await asyncio.shield(metered.early) if metered.early is not None else None
        if held is None or held.guess is None or not held.reserved.covers:
            return None
        metered.allowance.tokens = held.reserved.allowance
        return held.guess.prompt_tokens, held.guess.max_tokens


def _tracked(attempt: Attempt[S], metered: Metered) -> Attempt[S]:
    """attempt, noting in metered the backend of each try (the last is the one that answered)."""

    def on(replica: Replica) -> AsyncGenerator[S, None]:
        metered.backend = backend_of(replica.address)
        return attempt(replica)

    return on


def _gen_ai_usage(span: trace.Span, metered: Metered) -> None:
    """The token counts the replica reported last, as the GenAI conventions name them."""
    last = metered.last
    if last is not None:
        genai.record_usage(span, last.prompt_tokens, last.completion_tokens)


async def _timed(
    replica_steps: AsyncGenerator[S, None], metered: Metered, timer: metrics.GenerationTimer, span: trace.Span
) -> AsyncGenerator[S, None]:
    """The replica's steps, timed and metered as they pass."""
    try:
        async with aclosing(replica_steps) as steps:
            async for step in steps:
                at = time.monotonic()
                if metered.last is None:
                    metered.first_token = at
                    span.add_event("first_token")
                timer.step(at, step.completion_tokens)
                metered.last = step
                if getattr(step, "stopped_at_allowance", False):
                    metered.allowance.stopped = True
                if step.finish_reason in FINISHED:
                    metered.outcome = "completed"
                elif getattr(step, "failed", False):
                    metered.outcome = "failed"
                yield step
    except Exception:
        metered.outcome = "failed"
        raise
