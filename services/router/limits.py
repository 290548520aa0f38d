"""Request and token limits decided in the router itself: the rate-limit service's limiter, on the same Redis
and the same rules, without a call to the service on a generation's path.

Counting a request and holding its tokens is one call to the rate-limit service over gRPC (budget.py) or,
here, the same decision made in process: two Redis scripts and no gRPC hop, which was about a third of the
mesh's CPU per request and the largest wait before the first token (bench/reports/gateways.md). Failure
modes are the rules' own, as in the service; settlement runs off the request's path, retried."""

from __future__ import annotations

import asyncio
import logging

from services.ratelimit.limiter import Limiter, Reservation, TokenCaller, TokenHold
from services.ratelimit.windows import WindowState
from services.router.accounting import HOLD_IF_ROOM, HOLD_NONE, HOLD_REQUIRED, Reserved, Window
from services.router.budget import SETTLE_FAILURES
from services.router.caller import Caller
from services.runtime import tracing
from services.runtime.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

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
    return Reserved(reservation.held or not reservation.enforced, tuple(windows), reservation.held)


def _caller(caller: Caller) -> TokenCaller:
    return TokenCaller(caller.tenant, caller.key_id, caller.tokens_per_minute, caller.requests_per_minute)


class LocalTokenBudget:
    """The TokenBudget of accounting.py over a Limiter in this process."""

    def __init__(self, limiter: Limiter, settle_attempts: int = 5) -> None:
        self._limiter = limiter
        self._attempts = settle_attempts
        self._pending: set[asyncio.Task[None]] = set()

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
        settle = self._settle(request_id, _caller(caller), model, prompt_tokens, completion_tokens, outcome)
        task = asyncio.get_running_loop().create_task(settle)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _settle(
        self, request_id: str, caller: TokenCaller, model: str, prompt_tokens: int, completion_tokens: int, outcome: str
    ) -> None:
        delay = 0.1
        for attempt in range(1, self._attempts + 1):
            try:
                learn = outcome == "completed"
                await self._limiter.settle(request_id, caller, model, prompt_tokens, completion_tokens, learn)
                return
            except (Unavailable, InvalidArgument) as exc:
                if attempt == self._attempts or isinstance(exc, InvalidArgument):
                    SETTLE_FAILURES.inc()
                    log.error(
                        "token settlement failed; the reservation counts until its window ends",
                        extra={"request_id": request_id, "error": str(exc)},
                    )
                    return
            await asyncio.sleep(delay)
            delay *= 2

    async def close(self) -> None:
        """Waits for pending settlements."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=10)
