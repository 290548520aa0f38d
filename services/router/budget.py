"""Request and token limits over gRPC: count the request and reserve tokens before generating, settle after,
off the request's path."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio
from prometheus_client import Counter

from meshserve.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc
from services.router.accounting import HOLD_IF_ROOM, HOLD_NONE, HOLD_REQUIRED, Reserved, Window
from services.router.caller import Caller
from services.runtime import errors, keepalive, tls, tracing
from services.runtime.openai_errors import ERROR_TYPE_HEADER

log = logging.getLogger(__name__)

UNCHECKED = Counter(
    "meshserve_router_token_budget_unchecked_total",
    "Requests let through unchecked because the rate-limit service was unreachable (fail-open).",
)
SETTLE_FAILURES = Counter(
    "meshserve_router_token_settle_failures_total",
    "Settlements given up after retries; the reservation then counts until its window ends.",
)

OUTCOMES = {
    "completed": ratelimit_pb2.OUTCOME_COMPLETED,
    "cancelled": ratelimit_pb2.OUTCOME_CANCELLED,
    "failed": ratelimit_pb2.OUTCOME_FAILED,
}


HOLDS = {
    HOLD_REQUIRED: ratelimit_pb2.HOLD_REQUIRED,
    HOLD_IF_ROOM: ratelimit_pb2.HOLD_IF_ROOM,
    HOLD_NONE: ratelimit_pb2.HOLD_NONE,
}


def _caller(caller: Caller) -> ratelimit_pb2.Caller:
    return ratelimit_pb2.Caller(
        tenant=caller.tenant,
        key_id=caller.key_id,
        key_tokens_per_minute=caller.tokens_per_minute,
        key_requests_per_minute=caller.requests_per_minute,
        key_budget=caller.budget,
    )


def _reserved(reply: ratelimit_pb2.ReserveResponse) -> Reserved:
    windows = []
    if reply.HasField("requests"):
        r = reply.requests
        windows.append(Window("requests", r.limit, r.remaining, r.reset_seconds))
    if reply.enforced and reply.limit_tokens:
        windows.append(Window("tokens", reply.limit_tokens, reply.remaining_tokens, reply.reset_seconds))
    allowance = reply.allowance_tokens if reply.capped else None
    return Reserved(reply.held or not reply.enforced, tuple(windows), reply.held, allowance)


def _refusal(exc: aio.AioRpcError) -> errors.ResourceExhausted:
    """The rate-limit service's RESOURCE_EXHAUSTED as the domain error it was: a spend budget's
    insufficient_quota, or a limit's refusal with its retry delay."""
    trailers = dict(exc.trailing_metadata() or ())
    if trailers.get(ERROR_TYPE_HEADER) == errors.QuotaExceeded.error_type:
        return errors.QuotaExceeded(exc.details() or "spend budget exhausted")
    return errors.ResourceExhausted(exc.details() or "rate limit reached", _retry_after(exc))


def _retry_after(exc: aio.AioRpcError) -> float | None:
    for key, value in exc.trailing_metadata() or ():
        if key == "retry-after" and isinstance(value, str) and value.isdigit():
            return float(value)
    return None


_SERVICE = ratelimit_pb2.DESCRIPTOR.services_by_name["TokenBudgetService"].full_name
RESERVE, SETTLE, EXTEND = f"/{_SERVICE}/Reserve", f"/{_SERVICE}/Settle", f"/{_SERVICE}/Extend"


class Settler:
    """Settlements off the request's path: each retried with backoff until it lands, is refused, or runs out of
    attempts (the reservation then counts until its window ends); close() waits for those under way."""

    def __init__(
        self, attempts: int, errors: tuple[type[Exception], ...], refused: Callable[[Any], bool] = lambda exc: False
    ) -> None:
        self._attempts = attempts
        self._errors = errors
        self._refused = refused
        self._pending: set[asyncio.Task[None]] = set()

    def settle(self, request_id: str, call: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Runs call until it lands; the task ends then, or once it gave up (it never raises)."""
        task = asyncio.get_running_loop().create_task(self._run(request_id, call))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def _run(self, request_id: str, call: Callable[[], Awaitable[None]]) -> None:
        delay = 0.1
        for attempt in range(1, self._attempts + 1):
            try:
                await call()
                return
            except self._errors as exc:
                if attempt == self._attempts or self._refused(exc):
                    SETTLE_FAILURES.inc()
                    error = exc.code().name if isinstance(exc, aio.AioRpcError) else str(exc)
                    log.error(
                        "token settlement failed; the reservation counts until its window ends",
                        extra={"request_id": request_id, "error": error},
                    )
                    return
            await asyncio.sleep(delay)
            delay *= 2

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=10)


class GrpcTokenBudget:
    """The rate-limit service's TokenBudgetService, as the router uses it."""

    def __init__(
        self,
        address: str,
        fail_open: bool,
        settle_attempts: int = 5,
        files: tls.Files | None = None,
        requests_fail_open: bool = True,
    ) -> None:
        self._channel = tls.MeshChannel(
            address, files, "ratelimit", ratelimit_pb2_grpc.TokenBudgetServiceStub, keepalive.channel_options()
        )
        # Each kind's failure mode, as the rules say: tokens for a reservation, requests for a count.
        self._fail_open = fail_open
        self._requests_fail_open = requests_fail_open
        self._settler = Settler(
            settle_attempts, (aio.AioRpcError,), lambda exc: exc.code() == grpc.StatusCode.INVALID_ARGUMENT
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
        a retry delay) before any GPU work."""
        request = ratelimit_pb2.ReserveRequest(
            request_id=request_id,
            caller=_caller(caller),
            model=model,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            count_request=count_request,
            hold=HOLDS[hold],
        )
        try:
            with tracing.client_call(RESERVE) as metadata:
                reply = await self._channel.stub.Reserve(request, timeout=2, metadata=metadata)
        except aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise _refusal(exc) from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise errors.InvalidArgument(exc.details() or "") from None
            if not (self._requests_fail_open if count_request else self._fail_open):
                kind = "request" if count_request else "token"
                raise errors.LimitsUnavailable(f"{kind} limits cannot be checked right now") from None
            UNCHECKED.inc()
            log.warning(
                "rate-limit service unreachable; generating without checking its limits (fail-open)",
                extra={"request_id": request_id, "error": code.name, "counting": count_request},
            )
            # An unchecked count leaves the tokens to the measured reservation, under the tokens' failure mode.
            return Reserved(covers=not count_request)
        return _reserved(reply)

    def settle(
        self, request_id: str, caller: Caller, model: str, prompt_tokens: int, completion_tokens: int, outcome: str
    ) -> None:
        """Settles in the background with retries; never raises, never delays the response."""
        request = ratelimit_pb2.SettleRequest(
            request_id=request_id,
            caller=_caller(caller),
            model=model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            outcome=OUTCOMES[outcome],
        )
        self._settler.settle(request_id, functools.partial(self._settle, request))

    async def extend(self, request_id: str, caller: Caller, model: str, more_tokens: int) -> int | None:
        """Holds money for more completion tokens; where the service cannot be reached, none is held (the
        stream stops at what it holds: never unbudgeted spend)."""
        request = ratelimit_pb2.ExtendRequest(
            request_id=request_id, caller=_caller(caller), model=model, more_tokens=more_tokens
        )
        try:
            with tracing.client_call(EXTEND) as metadata:
                reply = await self._channel.stub.Extend(request, timeout=2, metadata=metadata)
        except aio.AioRpcError as exc:
            log.warning("spend extension failed", extra={"request_id": request_id, "error": exc.code().name})
            return 0
        return reply.allowance_tokens if reply.capped else None

    async def _settle(self, request: ratelimit_pb2.SettleRequest) -> None:
        with tracing.client_call(SETTLE) as metadata:
            await self._channel.stub.Settle(request, timeout=2, metadata=metadata)

    async def close(self) -> None:
        """Waits for pending settlements, then closes the channel."""
        await self._settler.close()
        await self._channel.close()
