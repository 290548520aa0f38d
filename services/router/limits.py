"""Request and token limits decided in the router itself: the rate-limit service's limiter, on the same Redis
and the same rules, without a call to the service on a generation's path.

Counting a request and holding its tokens is one call to the rate-limit service over gRPC (budget.py) or,
here, the same decision made in process: two Redis scripts and no gRPC hop, which was about a third of the
mesh's CPU per request and the largest wait before the first token (bench/reports/gateways.md). Failure
modes are the rules' own, as in the service; settlement runs off the request's path, retried."""

from __future__ import annotations

from collections.abc import Awaitable

from services.ratelimit.budgets import Budget
from services.ratelimit.decisions import Reservation, TokenCaller, TokenHold
from services.ratelimit.limiter import Limiter
from services.ratelimit.spares import Spares
from services.ratelimit.windows import WindowState
from services.router.accounting import HOLD_IF_ROOM, HOLD_NONE, HOLD_REQUIRED, Reserved, Window
from services.router.budget import Settler
from services.router.caller import Caller
from services.router.spares import SpareKeeper
from services.runtime import tracing
from services.runtime.errors import InvalidArgument, ResourceExhausted, Unavailable

HOLDS = {HOLD_REQUIRED: TokenHold.REQUIRED, HOLD_IF_ROOM: TokenHold.IF_ROOM, HOLD_NONE: TokenHold.NONE}


def _window(kind: str, state: WindowState) -> Window:
    return Window(kind, state.limit.limit, state.remaining, state.reset_seconds)


def reserved(reservation: Reservation) -> Reserved:
    """What the router keeps of a reservation: whether it covers its counts, and its tightest windows."""
    windows = []
    if reservation.requests is not None:
        windows.append(_window("requests", reservation.requests))
    if reservation.enforced and reservation.tightest is not None:
        windows.append(_window("tokens", reservation.tightest))
    spend = reservation.spend
    allowance = spend.allowance if spend is not None else None
    return Reserved(reservation.held or not reservation.enforced, tuple(windows), reservation.held, allowance)


def _caller(caller: Caller) -> TokenCaller:
    budget = Budget.parse(caller.budget) if caller.budget else None
    return TokenCaller(caller.tenant, caller.key_id, caller.tokens_per_minute, caller.requests_per_minute, budget)


class LocalTokenBudget:
    """The TokenBudget of accounting.py over a Limiter in this process."""

    def __init__(self, limiter: Limiter, settle_attempts: int = 5, spares: Spares | None = None) -> None:
        self._limiter = limiter
        # Retried while Redis is away and the rules fail closed; a refusal (InvalidArgument) is not retried.
        self._settler = Settler(
            settle_attempts, (Unavailable, InvalidArgument), lambda exc: isinstance(exc, InvalidArgument)
        )
        self._spares = SpareKeeper(spares, self._settler.settle) if spares is not None else None

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
        """Counts the request when asked and holds the tokens as hold says, or raises ResourceExhausted (with
        a retry delay) before any GPU work; Unavailable where Redis is down and the rules fail closed."""
        who = _caller(caller)
        spares = self._spares if count_request and hold == HOLD_IF_ROOM else None
        if spares is not None and (taken := spares.take(request_id, who, model, prompt_tokens, max_tokens)):
            spares.decided(who, model, prompt_tokens, max_tokens)
            return reserved(taken)
        if self._spares is not None:
            self._spares.leave(request_id)  # its measured counts, held under its own id
        attributes = {"meshserve.request_counted": count_request, "meshserve.hold": hold}

        def decide() -> Awaitable[Reservation]:
            return self._limiter.reserve(
                request_id, who, model, prompt_tokens, max_tokens, count_request=count_request, hold=HOLDS[hold]
            )

        with tracing.span("router.reserve", attributes) as span:
            try:
                reservation = await decide()
            except ResourceExhausted:
                if spares is None:
                    raise
                # Refused while a spare was on its way or held: the room it holds is this request's; or while one
                # gave its room back: decided again once that landed.
                coming, again = await spares.after_refusal(request_id, who, model, prompt_tokens, max_tokens)
                if coming is None and not again:
                    raise
                reservation = coming or await decide()
            span.set_attribute("meshserve.reserved_tokens", reservation.reserved_tokens)
        if spares is not None and reservation.held:
            spares.decided(who, model, prompt_tokens, max_tokens)
        return reserved(reservation)

    def settle(
        self, request_id: str, caller: Caller, model: str, prompt_tokens: int, completion_tokens: int, outcome: str
    ) -> None:
        """Settles in the background with retries; never raises, never delays the response."""
        who = _caller(caller)
        learn = outcome == "completed"
        if self._spares is not None and self._spares.settle(request_id, prompt_tokens, completion_tokens, learn):
            return  # into the spare it took from, settled with the spare's other requests

        async def settle() -> None:
            await self._limiter.settle(request_id, who, model, prompt_tokens, completion_tokens, learn)

        self._settler.settle(request_id, settle)

    async def extend(self, request_id: str, caller: Caller, model: str, more_tokens: int) -> int | None:
        """Holds money for more completion tokens; where Redis fails, none (the stream stops at what it holds)."""
        try:
            held = await self._limiter.extend(request_id, _caller(caller), model, more_tokens)
        except Unavailable:
            return 0
        return held.allowance if held is not None else None

    async def close(self) -> None:
        """Releases the spares held, and waits for pending settlements."""
        if self._spares is not None:
            await self._spares.close()
        await self._settler.close()
