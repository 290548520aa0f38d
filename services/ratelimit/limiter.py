"""Rate-limit decisions: request limits for Envoy's descriptors and token reservations, with failure modes."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from services.ratelimit.rules import FailureMode, Kind, Limit, Rules, Scope
from services.ratelimit.windows import SlidingWindows, WindowState, tightest
from services.runtime.errors import InvalidArgument, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

DECISIONS = Counter(
    "meshserve_ratelimit_decisions_total",
    "Rate-limit decisions by kind and outcome (admitted, limited, failed_open, failed_closed).",
    ["kind", "outcome"],
)
REDIS_UP = Gauge("meshserve_ratelimit_redis_up", "1 while the last Redis call of this kind succeeded.", ["kind"])
TOKENS_RETURNED = Counter(
    "meshserve_ratelimit_tokens_returned_total", "Reserved tokens returned to budgets at settlement."
)
TOKENS_CHARGED = Counter(
    "meshserve_ratelimit_tokens_overcharged_total", "Tokens charged at settlement beyond the reservation."
)

# Envoy descriptor entries this service understands.
TENANT, KEY_ID, KEY_RPM, MODEL = "tenant", "key_id", "key_rpm", "model"


@dataclass(frozen=True)
class DescriptorResult:
    """The tightest window of one descriptor, for Envoy's per-descriptor status and x-ratelimit headers."""

    over_limit: bool
    window: WindowState | None


@dataclass(frozen=True)
class RequestDecision:
    """A decision over every descriptor of one request."""

    admitted: bool
    descriptors: tuple[DescriptorResult, ...]
    retry_after_seconds: float | None
    # False when Redis was unreachable and the fail-open mode let the request through.
    enforced: bool = True


@dataclass(frozen=True)
class Reservation:
    """Tokens held for one generation."""

    reserved_tokens: int
    estimated_completion_tokens: int
    enforced: bool


@dataclass(frozen=True)
class TokenCaller:
    """Whose budgets a reservation draws on."""

    tenant: str
    key_id: str
    key_tokens_per_minute: int = 0


def _descriptor_limits(rules: Rules, entries: Mapping[str, str]) -> list[Limit]:
    tenant = entries.get(TENANT)
    if not tenant:
        raise InvalidArgument(f"descriptor {dict(entries)} has no {TENANT!r} entry")
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

    def __init__(self, rules: Callable[[], Rules], windows: SlidingWindows) -> None:
        self._rules = rules
        self._windows = windows
        self._redis_down: dict[Kind, bool] = {Kind.REQUESTS: False, Kind.TOKENS: False}
        for kind in Kind:
            REDIS_UP.labels(kind.value).set(1)

    def _redis_ok(self, kind: Kind) -> None:
        if self._redis_down[kind]:
            self._redis_down[kind] = False
            REDIS_UP.labels(kind.value).set(1)
            log.warning("redis reachable again; %s limits enforced", kind.value, extra={"kind": kind.value})

    def _redis_failed(self, kind: Kind, exc: Exception) -> FailureMode:
        """Records the failure; returns the mode to apply (CLOSED callers raise)."""
        mode = self._rules().failure_mode(kind)
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
        return mode

    async def check_requests(self, descriptors: Sequence[Mapping[str, str]], hits: int = 1) -> RequestDecision:
        """Admits one request (hits units) against every descriptor's windows, or against none."""
        rules = self._rules()
        groups = [_descriptor_limits(rules, d) for d in descriptors]
        limits = [lim for group in groups for lim in group]
        if not limits:
            DECISIONS.labels(Kind.REQUESTS.value, "admitted").inc()
            return RequestDecision(True, tuple(DescriptorResult(False, None) for _ in groups), None)
        try:
            admission = await self._windows.admit(limits, secrets.token_hex(8), max(1, hits))
        except (RedisError, OSError) as exc:
            if self._redis_failed(Kind.REQUESTS, exc) is FailureMode.CLOSED:
                raise Unavailable("rate limits cannot be checked right now (Redis unreachable)") from exc
            return RequestDecision(True, tuple(DescriptorResult(False, None) for _ in groups), None, enforced=False)
        self._redis_ok(Kind.REQUESTS)
        DECISIONS.labels(Kind.REQUESTS.value, "admitted" if admission.admitted else "limited").inc()
        results, at = [], 0
        for group in groups:
            states = admission.windows[at : at + len(group)]
            at += len(group)
            over = not admission.admitted and any(s.used + max(1, hits) > s.limit.limit for s in states)
            results.append(DescriptorResult(over, tightest(states)))
        return RequestDecision(admission.admitted, tuple(results), admission.retry_after_seconds)

    async def reserve(
        self, request_id: str, caller: TokenCaller, model: str, prompt_tokens: int, max_tokens: int
    ) -> Reservation:
        """Holds prompt tokens plus a completion estimate, or refuses with ResourceExhausted."""
        rules = self._rules()
        limits = rules.tokens(caller.tenant, caller.key_id, caller.key_tokens_per_minute)
        if not limits:
            return Reservation(prompt_tokens + max_tokens, max_tokens, enforced=False)
        try:
            admission = await self._windows.admit(
                limits,
                request_id,
                prompt_tokens,
                max_extra=max_tokens,
                reservation_key=rules.reservation_key(caller.tenant, request_id),
                estimate_key=rules.estimate_key(caller.tenant, caller.key_id, model),
            )
        except (RedisError, OSError) as exc:
            if self._redis_failed(Kind.TOKENS, exc) is FailureMode.CLOSED:
                raise Unavailable("token budgets cannot be checked right now (Redis unreachable)") from exc
            return Reservation(prompt_tokens + max_tokens, max_tokens, enforced=False)
        self._redis_ok(Kind.TOKENS)
        DECISIONS.labels(Kind.TOKENS.value, "admitted" if admission.admitted else "limited").inc()
        if admission.admitted:
            return Reservation(admission.amount, admission.estimate, enforced=True)
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
        self, request_id: str, caller: TokenCaller, model: str, prompt_tokens: int, completion_tokens: int, learn: bool
    ) -> tuple[bool, int]:
        """Puts the real count in place of the reservation; (settled, tokens returned)."""
        rules = self._rules()
        limits = rules.tokens(caller.tenant, caller.key_id, caller.key_tokens_per_minute)
        if not limits:
            return False, 0
        try:
            settled, returned = await self._windows.settle(
                limits,
                request_id,
                prompt_tokens + completion_tokens,
                reservation_key=rules.reservation_key(caller.tenant, request_id),
                estimate_key=rules.estimate_key(caller.tenant, caller.key_id, model),
                learn_completion=completion_tokens if learn else None,
            )
        except (RedisError, OSError) as exc:
            if self._redis_failed(Kind.TOKENS, exc) is FailureMode.CLOSED:
                raise Unavailable("token budgets cannot be settled right now (Redis unreachable)") from exc
            return False, 0
        self._redis_ok(Kind.TOKENS)
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
        try:
            admission = await self._windows.admit(limits, "", 0, dry=True)
        except (RedisError, OSError) as exc:
            self._redis_failed(Kind.TOKENS, exc)
            raise Unavailable("token budgets cannot be read right now (Redis unreachable)") from exc
        self._redis_ok(Kind.TOKENS)
        return admission.windows
