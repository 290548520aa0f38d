"""The rate-limit service's gRPC servicers: Envoy's RateLimitService and meshserve's TokenBudgetService."""

from __future__ import annotations

import math
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc import aio
from opentelemetry import trace

from meshserve.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc
from services.ratelimit.budgets import Budget
from services.ratelimit.decisions import RequestDecision, TokenCaller, TokenHold
from services.ratelimit.limiter import Limiter
from services.ratelimit.spend import Held
from services.ratelimit.windows import WindowState
from services.runtime.errors import InvalidArgument, echo

Context = aio.ServicerContext[Any, Any]

_RLS = rls_pb2.RateLimitResponse
_UNITS = {1: _RLS.RateLimit.SECOND, 60: _RLS.RateLimit.MINUTE, 3600: _RLS.RateLimit.HOUR}
_UINT32 = 2**32 - 1  # Envoy's fields are uint32; larger limits are reported as "unbounded"


def _header(key: str, value: str) -> base_pb2.HeaderValue:
    return base_pb2.HeaderValue(key=key, value=value)


def _seconds(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") + "s"


def _status(over: bool, window: WindowState | None) -> rls_pb2.RateLimitResponse.DescriptorStatus:
    status = _RLS.DescriptorStatus(code=_RLS.OVER_LIMIT if over else _RLS.OK)
    if window is not None:
        status.current_limit.requests_per_unit = min(window.limit.limit, _UINT32)
        status.current_limit.unit = _UNITS[window.limit.seconds]
        status.limit_remaining = min(window.remaining, _UINT32)
        status.duration_until_reset.FromNanoseconds(int(window.reset_seconds * 1e9))
    return status


def rls_response(decision: RequestDecision) -> rls_pb2.RateLimitResponse:
    """Envoy's response: per-descriptor statuses, OpenAI's x-ratelimit-* headers and, when limited, Retry-After."""
    response = _RLS(overall_code=_RLS.OK if decision.admitted else _RLS.OVER_LIMIT)
    response.statuses.extend(_status(d.over_limit, d.window) for d in decision.descriptors)
    tight = decision.tightest()
    if tight is not None:
        response.response_headers_to_add.extend(
            [
                _header("x-ratelimit-limit-requests", str(tight.limit.limit)),
                _header("x-ratelimit-remaining-requests", str(tight.remaining)),
                _header("x-ratelimit-reset-requests", _seconds(tight.reset_seconds)),
            ]
        )
    if not decision.admitted:
        retry = decision.retry_after_seconds
        if retry is not None:
            response.response_headers_to_add.append(_header("retry-after", str(max(1, math.ceil(retry)))))
        response.raw_body = decision.refusal().encode()
    return response


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    """envoy.service.ratelimit.v3.RateLimitService: request limits for the edge."""

    def __init__(self, limiter: Limiter, domain: str) -> None:
        self._limiter = limiter
        self._domain = domain

    async def ShouldRateLimit(self, request: rls_pb2.RateLimitRequest, context: Context) -> rls_pb2.RateLimitResponse:
        if request.domain != self._domain:
            raise InvalidArgument(
                f"unknown rate-limit domain {echo(request.domain)}; this service serves {self._domain!r}"
            )
        descriptors = [{e.key: e.value for e in d.entries} for d in request.descriptors]
        decision = await self._limiter.check_requests(descriptors, request.hits_addend or 1)
        # The call's own span (the runtime's) is the decision's.
        span = trace.get_current_span()
        span.set_attribute("meshserve.admitted", decision.admitted)
        span.set_attribute("meshserve.enforced", decision.enforced)
        return rls_response(decision)


def _caller(caller: ratelimit_pb2.Caller) -> TokenCaller:
    if not caller.tenant or not caller.key_id:
        raise InvalidArgument("caller.tenant and caller.key_id are required")
    budget = Budget.parse(caller.key_budget) if caller.key_budget else None
    return TokenCaller(
        caller.tenant, caller.key_id, caller.key_tokens_per_minute, caller.key_requests_per_minute, budget
    )


def _allowance(held: Held | None) -> tuple[bool, int]:
    """Whether a request is capped, and at how many completion tokens."""
    if held is None or held.allowance is None:
        return False, 0
    return True, min(held.allowance, _UINT32)


HOLDS = {
    ratelimit_pb2.HOLD_UNSPECIFIED: TokenHold.REQUIRED,
    ratelimit_pb2.HOLD_REQUIRED: TokenHold.REQUIRED,
    ratelimit_pb2.HOLD_IF_ROOM: TokenHold.IF_ROOM,
    ratelimit_pb2.HOLD_NONE: TokenHold.NONE,
}


class TokenBudgetServicer(ratelimit_pb2_grpc.TokenBudgetServiceServicer):
    """meshserve.ratelimit.v1.TokenBudgetService over Limiter."""

    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter

    async def Reserve(self, request: ratelimit_pb2.ReserveRequest, context: Context) -> ratelimit_pb2.ReserveResponse:
        if not request.request_id:
            raise InvalidArgument("request_id is required")
        caller = _caller(request.caller)
        if request.hold not in HOLDS:
            raise InvalidArgument(f"hold: unknown value {request.hold}")
        reservation = await self._limiter.reserve(
            request.request_id,
            caller,
            request.model,
            request.prompt_tokens,
            request.max_tokens,
            count_request=request.count_request,
            hold=HOLDS[request.hold],
        )
        span = trace.get_current_span()
        span.set_attribute("meshserve.reserved_tokens", reservation.reserved_tokens)
        span.set_attribute("meshserve.request_counted", request.count_request)
        capped, allowance = _allowance(reservation.spend)
        reply = ratelimit_pb2.ReserveResponse(
            reserved_tokens=reservation.reserved_tokens,
            estimated_completion_tokens=reservation.estimated_completion_tokens,
            enforced=reservation.enforced,
            held=reservation.held,
            capped=capped,
            allowance_tokens=allowance,
        )
        if (window := reservation.tightest) is not None:
            reply.limit_tokens = min(window.limit.limit, _UINT32)
            reply.remaining_tokens = min(window.remaining, _UINT32)
            reply.reset_seconds = window.reset_seconds
        if (requests := reservation.requests) is not None:
            reply.requests.limit = min(requests.limit.limit, _UINT32)
            reply.requests.remaining = min(requests.remaining, _UINT32)
            reply.requests.reset_seconds = requests.reset_seconds
        return reply

    async def Settle(self, request: ratelimit_pb2.SettleRequest, context: Context) -> ratelimit_pb2.SettleResponse:
        if not request.request_id:
            raise InvalidArgument("request_id is required")
        if request.outcome == ratelimit_pb2.OUTCOME_UNSPECIFIED:
            raise InvalidArgument("outcome is required")
        settled, returned = await self._limiter.settle(
            request.request_id,
            _caller(request.caller),
            request.model,
            request.prompt_tokens,
            request.completion_tokens,
            learn=request.outcome == ratelimit_pb2.OUTCOME_COMPLETED,
        )
        return ratelimit_pb2.SettleResponse(settled=settled, returned_tokens=returned)

    async def Extend(self, request: ratelimit_pb2.ExtendRequest, context: Context) -> ratelimit_pb2.ExtendResponse:
        if not request.request_id:
            raise InvalidArgument("request_id is required")
        held = await self._limiter.extend(
            request.request_id, _caller(request.caller), request.model, request.more_tokens
        )
        capped, allowance = _allowance(held)
        return ratelimit_pb2.ExtendResponse(capped=capped, allowance_tokens=allowance)

    async def GetBudget(
        self, request: ratelimit_pb2.GetBudgetRequest, context: Context
    ) -> ratelimit_pb2.GetBudgetResponse:
        windows = await self._limiter.budget(_caller(request.caller))
        return ratelimit_pb2.GetBudgetResponse(
            windows=[
                ratelimit_pb2.Window(
                    scope=w.limit.scope.value, limit=w.limit.limit, used=w.used, window_seconds=w.limit.seconds
                )
                for w in windows
            ]
        )
