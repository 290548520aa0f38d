"""Rate-limit decisions: request limits for Envoy's descriptors, token reservations and spend budgets, with
failure modes."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import TypeVar

from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from services.ratelimit.decisions import (
    KEY_ID,
    KEY_RPM,
    MODEL,
    TENANT,
    DescriptorResult,
    RequestDecision,
    Reservation,
    TokenCaller,
    TokenHold,
)
from services.ratelimit.rules import FailureMode, Kind, Limit, Rules, Scope
from services.ratelimit.spend import Held, Spend
from services.ratelimit.windows import Admission, Ask, SlidingWindows, WindowState, tightest
from services.runtime.errors import (
    InvalidArgument,
    LimitsUnavailable,
    QuotaExceeded,
    ResourceExhausted,
    echo,
)

log = logging.getLogger(__name__)

DECISIONS = Counter(
    "meshserve_ratelimit_decisions_total",
    "Rate-limit decisions by kind and outcome (admitted, limited, failed_open, failed_closed).",
    ["kind", "outcome"],
)
REDIS_ERRORS = Counter(
    "meshserve_ratelimit_redis_errors_total",
    "Limiter calls to Redis that failed, by error (TimeoutError: Redis or this process too slow; "
    "ConnectionError: no connection, even after one retry on a fresh one).",
    ["error"],
)
REDIS_UP = Gauge("meshserve_ratelimit_redis_up", "1 while the last Redis call of this kind succeeded.", ["kind"])
TOKENS_RETURNED = Counter(
    "meshserve_ratelimit_tokens_returned_total", "Reserved tokens returned to budgets at settlement."
)
TOKENS_CHARGED = Counter(
    "meshserve_ratelimit_tokens_overcharged_total", "Tokens charged at settlement beyond the reservation."
)

T = TypeVar("T")


def _descriptor_limits(rules: Rules, entries: Mapping[str, str]) -> list[Limit]:
    tenant = entries.get(TENANT)
    if not tenant:
        raise InvalidArgument(f"descriptor {echo(dict(entries))} has no {TENANT!r} entry")
    unknown = set(entries) - {TENANT, KEY_ID, KEY_RPM, MODEL}
    if unknown:
        raise InvalidArgument(f"descriptor entries {sorted(unknown)} are not understood")
    if KEY_ID in entries:
        rpm = entries.get(KEY_RPM, "0")
        if not rpm.isdigit():
            raise InvalidArgument(f"descriptor entry {KEY_RPM!r} must be a whole number")
        return rules.requests(Scope.KEY, tenant, key_id=entries[KEY_ID], key_rpm=int(rpm))
    if MODEL in entries:
        return rules.requests(Scope.TENANT_MODEL, tenant, model=entries[MODEL])
    return rules.requests(Scope.TENANT, tenant)


def _per_minute(limits: Sequence[Limit], scope: Scope) -> str:
    return ", ".join(f"{lim.limit} per {lim.seconds} s" for lim in limits if lim.scope is scope)


class Limiter:
    """Request limits and token budgets over shared sliding windows."""

    def __init__(
        self,
        rules: Callable[[], Rules],
        windows: SlidingWindows,
        spend: Spend | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._rules = rules
        self._windows = windows
        self._spend = spend
        self._clock = clock
        self._redis_down: dict[Kind, bool] = dict.fromkeys(Kind, False)
        for kind in Kind:
            REDIS_UP.labels(kind.value).set(1)

    @property
    def rules(self) -> Rules:
        return self._rules()

    @property
    def windows(self) -> SlidingWindows:
        return self._windows

    def _failed(self, exc: Exception, *kinds: Kind, closed: bool = False) -> None:
        """Redis failed one call deciding these kinds: raises Unavailable where a kind fails closed."""
        REDIS_ERRORS.labels(type(exc).__name__).inc()
        for kind in kinds:
            self._fail(kind, exc, closed)

    def _fail(self, kind: Kind, exc: Exception, closed: bool) -> None:
        mode = FailureMode.CLOSED if closed else self._rules().failure_mode(kind)
        DECISIONS.labels(kind.value, f"failed_{mode.value}").inc()
        if not self._redis_down[kind]:
            self._redis_down[kind] = True
            REDIS_UP.labels(kind.value).set(0)
            log.error(
                "redis unreachable; %s limits fail %s",
                kind.value,
                mode.value,
                extra={"kind": kind.value, "mode": mode.value, "error": str(exc)},
            )
        if mode is FailureMode.CLOSED:
            raise LimitsUnavailable(f"{kind.value} limits cannot be checked right now (Redis unreachable)") from exc

    def _answered(self, kind: Kind) -> None:
        if self._redis_down[kind]:
            self._redis_down[kind] = False
            REDIS_UP.labels(kind.value).set(1)
            log.warning("redis reachable again; %s limits enforced", kind.value, extra={"kind": kind.value})

    async def _redis(self, kind: Kind, call: Awaitable[T], closed: bool = False) -> T | None:
        """The call's result; None when Redis failed and the kind fails open. Fails closed with Unavailable."""
        try:
            result = await call
        except (RedisError, OSError) as exc:
            self._failed(exc, kind, closed=closed)
            return None
        self._answered(kind)
        return result

    def request_ask(self, descriptors: Sequence[Mapping[str, str]], hits: int) -> tuple[list[list[Limit]], Ask]:
        groups = [_descriptor_limits(self._rules(), d) for d in descriptors]
        return groups, Ask([lim for group in groups for lim in group], secrets.token_hex(8), max(1, hits))

    @staticmethod
    def _decision(groups: list[list[Limit]], admission: Admission | None, hits: int) -> RequestDecision:
        """The decision over every descriptor's windows; admitted unenforced without an admission (failed open)."""
        if admission is None:
            enforced = not any(groups)
            if enforced:  # no limit applies: nothing was asked
                DECISIONS.labels(Kind.REQUESTS.value, "admitted").inc()
            return RequestDecision(True, tuple(DescriptorResult(False, None) for _ in groups), None, enforced)
        DECISIONS.labels(Kind.REQUESTS.value, "admitted" if admission.admitted else "limited").inc()
        results, at = [], 0
        for group in groups:
            states = admission.windows[at : at + len(group)]
            at += len(group)
            over = not admission.admitted and any(s.used + max(1, hits) > s.limit.limit for s in states)
            results.append(DescriptorResult(over, tightest(states)))
        return RequestDecision(admission.admitted, tuple(results), admission.retry_after_seconds)

    async def check_requests(self, descriptors: Sequence[Mapping[str, str]], hits: int = 1) -> RequestDecision:
        """Admits one request (hits units) against every descriptor's windows, or against none."""
        groups, ask = self.request_ask(descriptors, hits)
        return await self._count(groups, ask, hits)

    async def _count(self, groups: list[list[Limit]], ask: Ask, hits: int) -> RequestDecision:
        if not ask.limits:
            return self._decision(groups, None, hits)
        return self._decision(groups, await self._redis(Kind.REQUESTS, self._windows.admit_ask(ask)), hits)

    async def reserve(
        self,
        request_id: str,
        caller: TokenCaller,
        model: str,
        prompt_tokens: int,
        max_tokens: int,
        count_request: bool = False,
        hold: TokenHold = TokenHold.REQUIRED,
    ) -> Reservation:
        """Counts the request when asked (refused with ResourceExhausted, nothing held, over a request limit),
        then holds prompt tokens plus a completion estimate as hold says (REQUIRED: refused when they do not fit),
        then their expected cost in every spend budget that applies, as hold says (REQUIRED: refused with
        QuotaExceeded, the tokens returned, when it does not fit). Counting and holding tokens are one script
        in Redis; holding money in every budget is another, run at the same time."""
        rules = self._rules()
        budgets = (
            [] if hold is TokenHold.NONE else rules.budgets(caller.tenant, model, caller.key_id, caller.key_budget)
        )
        if not budgets:
            return await self._reserve_tokens(request_id, caller, model, prompt_tokens, max_tokens, count_request, hold)
        if self._spend is None:  # never spend unbudgeted
            raise LimitsUnavailable(
                "spend budgets apply to this request, but no price table is configured to price them"
            )
        applied = self._spend.applied(budgets, self._clock(), caller.tenant, model, caller.key_id)
        hold_key = rules.spend_key(caller.tenant, request_id)
        estimate_key = rules.estimate_key(caller.tenant, caller.key_id, model)
        index_key = rules.budget_index_key(caller.tenant)
        # Both decisions at once (two scripts in flight, one wait): the money goes back where the tokens were not
        # held, the tokens where the money was not.
        reservation, held = await asyncio.gather(
            self._reserve_tokens(request_id, caller, model, prompt_tokens, max_tokens, count_request, hold),
            self._redis(
                Kind.SPEND,
                self._spend.hold(applied, hold_key, estimate_key, index_key, model, prompt_tokens, max_tokens),
            ),
            return_exceptions=True,
        )
        tokens_fit = isinstance(reservation, Reservation) and (reservation.held or not reservation.enforced)
        if isinstance(held, Held) and held.held and not tokens_fit:
            await self._redis(Kind.SPEND, self._spend.settle(hold_key, estimate_key, model, 0, 0, learn=False))
        if isinstance(reservation, BaseException):
            raise reservation
        if isinstance(held, BaseException) or (held is not None and not held.held):
            if reservation.held:  # the tokens held go back
                await self.settle(request_id, caller, model, 0, 0, learn=False, spend=False)
            if isinstance(held, BaseException):
                raise held
        if not tokens_fit or held is None:  # a guess that did not fit; or Redis failed and budgets fail open
            return reservation
        DECISIONS.labels(Kind.SPEND.value, "admitted" if held.held else "limited").inc()
        if held.held:
            return replace(reservation, held=True, spend=held)
        if hold is TokenHold.IF_ROOM:
            return replace(reservation, enforced=True, held=False)
        raise QuotaExceeded(held.refusal(prompt_tokens))

    async def extend(self, request_id: str, caller: TokenCaller, model: str, more_tokens: int) -> Held | None:
        """Holds the cost of up to more_tokens further completion tokens of a request holding money, as far
        as its budgets have room; None where nothing is held (failed open, or settled)."""
        if self._spend is None:
            return None
        hold_key = self._rules().spend_key(caller.tenant, request_id)
        extended = await self._redis(Kind.SPEND, self._spend.extend(hold_key, model, more_tokens))
        if extended is None:
            return None
        allowance, left = extended
        return Held(True, 0, allowance, None, left)

    async def _reserve_tokens(
        self,
        request_id: str,
        caller: TokenCaller,
        model: str,
        prompt_tokens: int,
        max_tokens: int,
        count_request: bool,
        hold: TokenHold,
    ) -> Reservation:
        rules = self._rules()
        limits = rules.tokens(caller.tenant, caller.key_id, caller.key_tokens_per_minute)
        tokens = None
        if limits and hold is not TokenHold.NONE:
            tokens = Ask(
                limits,
                request_id,
                prompt_tokens,
                max_extra=max_tokens,
                reservation_key=rules.reservation_key(caller.tenant, request_id),
                estimate_key=rules.estimate_key(caller.tenant, caller.key_id, model),
            )
        requests, admission, asked = None, None, False
        if count_request:
            groups, ask = self.request_ask(caller.descriptors(model), 1)
            if ask.limits and tokens is not None:
                asked = True
                # Failed open (None): the request is not counted and no token is held.
                counted, admission = await self._count_and_hold(ask, tokens) or (None, None)
                decision = self._decision(groups, counted, 1)
            else:
                decision = await self._count(groups, ask, 1)
            if not decision.admitted:
                raise ResourceExhausted(decision.refusal(), retry_after_seconds=decision.retry_after_seconds)
            requests = decision.tightest()
        if not limits:
            return Reservation(prompt_tokens + max_tokens, max_tokens, enforced=False, requests=requests)
        if tokens is None:
            return Reservation(0, 0, enforced=True, requests=requests)
        if not asked:
            admission = await self._redis(Kind.TOKENS, self._windows.admit_ask(tokens))
        if admission is None:
            return Reservation(prompt_tokens + max_tokens, max_tokens, enforced=False, requests=requests)
        return self._held(admission, hold, limits, prompt_tokens, requests)

    async def _count_and_hold(self, count: Ask, hold: Ask) -> tuple[Admission, Admission | None] | None:
        """Both in one script; None when Redis failed and both kinds fail open (else Unavailable)."""
        try:
            result = await self._windows.admit_then(count, hold)
        except (RedisError, OSError) as exc:
            self._failed(exc, Kind.REQUESTS, Kind.TOKENS)
            return None
        self._answered(Kind.REQUESTS)
        self._answered(Kind.TOKENS)
        return result

    @staticmethod
    def _held(
        admission: Admission, hold: TokenHold, limits: Sequence[Limit], prompt_tokens: int, requests: WindowState | None
    ) -> Reservation:
        DECISIONS.labels(Kind.TOKENS.value, "admitted" if admission.admitted else "limited").inc()
        if admission.admitted:
            return Reservation(
                admission.amount, admission.estimate, True, tightest(admission.windows), held=True, requests=requests
            )
        if hold is TokenHold.IF_ROOM:
            return Reservation(0, admission.estimate, True, tightest(admission.windows), requests=requests)
        if admission.retry_after_seconds is None:
            raise ResourceExhausted(
                f"this request needs {admission.amount} tokens ({prompt_tokens} prompt + {admission.estimate} "
                f"completion), more than the token limit allows ({_per_minute(limits, Scope.KEY)} per key; "
                f"{_per_minute(limits, Scope.TENANT) or 'none'} per tenant): lower max_tokens or shorten the prompt"
            )
        raise ResourceExhausted(
            f"token limit reached: this request needs {admission.amount} tokens; "
            f"retry after {admission.retry_after_seconds:.1f} s",
            retry_after_seconds=admission.retry_after_seconds,
        )

    async def settle(
        self,
        request_id: str,
        caller: TokenCaller,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        learn: bool,
        spend: bool = True,
    ) -> tuple[bool, int]:
        """Puts the real count in place of the reservation, and the exact cost in place of the money held;
        (settled, tokens returned)."""
        rules = self._rules()
        limits = rules.tokens(caller.tenant, caller.key_id, caller.key_tokens_per_minute)
        budgets = rules.budgets(caller.tenant, model, caller.key_id, caller.key_budget) if spend else []
        if budgets and self._spend is not None:
            own = any(scope != "key" for scope, _, _ in budgets)
            charge = self._spend.settle(
                rules.spend_key(caller.tenant, request_id),
                rules.estimate_key(caller.tenant, caller.key_id, model),
                model,
                prompt_tokens,
                completion_tokens,
                learn=learn and not limits,  # the token windows' settlement learns where there are some
                tenant=caller.tenant if own else "other",
            )
            await self._redis(Kind.SPEND, charge, closed=True)  # retried by the caller until it lands
        if not limits:
            return False, 0
        settle = self._windows.settle(
            limits,
            request_id,
            prompt_tokens + completion_tokens,
            reservation_key=rules.reservation_key(caller.tenant, request_id),
            estimate_key=rules.estimate_key(caller.tenant, caller.key_id, model),
            learn_completion=completion_tokens if learn else None,
        )
        outcome = await self._redis(Kind.TOKENS, settle)
        if outcome is None:
            return False, 0
        settled, returned = outcome
        if returned >= 0:
            TOKENS_RETURNED.inc(returned)
        else:
            TOKENS_CHARGED.inc(-returned)
        return settled, returned

    async def budget(self, caller: TokenCaller) -> tuple[WindowState, ...]:
        """The caller's token windows as they stand."""
        limits = self._rules().tokens(caller.tenant, caller.key_id, caller.key_tokens_per_minute)
        if not limits:
            return ()
        # Reading has nothing to fall back on: always closed.
        admission = await self._redis(Kind.TOKENS, self._windows.admit(limits, "", 0, dry=True), closed=True)
        assert admission is not None
        return admission.windows
