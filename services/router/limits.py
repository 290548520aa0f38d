"""Request and token limits decided in the router itself: the rate-limit service's limiter, on the same Redis
and the same rules, without a call to the service on a generation's path.

Counting a request and holding its tokens is one call to the rate-limit service over gRPC (budget.py) or,
here, the same decision made in process: two Redis scripts and no gRPC hop, which was about a third of the
mesh's CPU per request and the largest wait before the first token (bench/reports/gateways.md). Failure
modes are the rules' own, as in the service; settlement runs off the request's path, retried."""

from __future__ import annotations

from services.ratelimit.budgets import Budget
from services.ratelimit.decisions import Reservation, TokenCaller, TokenHold
from services.ratelimit.limiter import Limiter
from services.ratelimit.windows import WindowState
from services.router.accounting import HOLD_IF_ROOM, HOLD_NONE, HOLD_REQUIRED, Reserved, Window
from services.router.budget import Settler
from services.router.caller import Caller
from services.runtime import tracing
from services.runtime.errors import InvalidArgument, Unavailable

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

    def __init__(self, limiter: Limiter, settle_attempts: int = 5) -> None:
        self._limiter = limiter
        # Retried while Redis is away and the rules fail closed; a refusal (InvalidArgument) is not retried.
        self._settler = Settler(
            settle_attempts, (Unavailable, InvalidArgument), lambda exc: isinstance(exc, InvalidArgument)
        )

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
        attributes = {"meshserve.request_counted": count_request, "meshserve.hold": hold}
        with tracing.span("router.reserve", attributes) as span:
            reservation = await self._limiter.reserve(
                request_id,
                _caller(caller),
                model,
                prompt_tokens,
                max_tokens,
                count_request=count_request,
                hold=HOLDS[hold],
            )
            span.set_attribute("meshserve.reserved_tokens", reservation.reserved_tokens)
        return reserved(reservation)

    def settle(
        self, request_id: str, caller: Caller, model: str, prompt_tokens: int, completion_tokens: int, outcome: str
    ) -> None:
        """Settles in the background with retries; never raises, never delays the response."""
        who = _caller(caller)
        learn = outcome == "completed"

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
        """Waits for pending settlements."""
        await self._settler.close()
