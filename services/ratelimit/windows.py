"""Sliding windows in Redis: every admission, settlement and reading is one atomic Lua script."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis

from services.ratelimit.rules import Limit
from services.ratelimit.scripts import Scripts, scripts_of

# estimate.lua's function first: admit.lua uses it.
ESTIMATE = (Path(__file__).parent / "estimate.lua").read_text()
_ADMIT = ESTIMATE + (Path(__file__).parent / "admit.lua").read_text()
_SETTLE = ESTIMATE + (Path(__file__).parent / "settle.lua").read_text()
# admit.lua as a function, called once or twice by admit_then.lua.
_ADMIT_THEN = (
    f"local function admit(KEYS, ARGV)\n{_ADMIT}\nend\n" + (Path(__file__).parent / "admit_then.lua").read_text()
)


@dataclass(frozen=True)
class WindowState:
    """One window after a decision: what it holds and when its oldest entry leaves."""

    limit: Limit
    used: int
    reset_seconds: float

    @property
    def remaining(self) -> int:
        return max(0, self.limit.limit - self.used)


@dataclass(frozen=True)
class Admission:
    """The outcome of one admission over all its windows."""

    admitted: bool
    amount: int
    estimate: int
    # Seconds until the same amount would fit; None when it never fits (larger than a limit).
    retry_after_seconds: float | None
    windows: tuple[WindowState, ...]


def tightest(states: Sequence[WindowState]) -> WindowState | None:
    """The window with the least room left, the one worth reporting to a caller."""
    return min(states, key=lambda w: (w.remaining, -w.limit.seconds), default=None)


@dataclass(frozen=True)
class Estimate:
    """How to estimate a completion: a percentile of the last `samples` completions, once there are `min_samples`."""

    percentile: float = 0.95
    min_samples: int = 8
    samples: int = 64


def _keys(limits: Sequence[Limit]) -> list[str]:
    return [k for limit in limits for k in (limit.redis_key + ":z", limit.redis_key + ":s")]


@dataclass(frozen=True)
class Ask:
    """One admission: amount (+ an estimate up to max_extra) into every window of limits, or into none."""

    limits: Sequence[Limit]
    member: str
    amount: int
    max_extra: int | None = None
    reservation_key: str | None = None
    estimate_key: str | None = None
    dry: bool = False
    now_ms: int | None = None
    # Stamped this long after now: an admission made ahead of its request (spares.py).
    ahead_ms: int = 0
    # The requests it holds tokens for: amount is their prompts, and it adds an estimate for each.
    times: int = 1

    def keys(self) -> list[str]:
        keys = _keys(self.limits)
        if self.reservation_key is not None:
            keys.append(self.reservation_key)
            if self.estimate_key is not None:
                keys.append(self.estimate_key)
        return keys

    def args(self, estimate: Estimate) -> list[str | int | float]:
        args: list[str | int | float] = [
            "" if self.now_ms is None else self.now_ms,
            self.member,
            self.amount,
            -1 if self.max_extra is None else self.max_extra,
            estimate.percentile,
            estimate.min_samples,
            1 if self.dry else 0,
            len(self.limits),
        ]
        for limit in self.limits:
            args += [limit.limit, limit.seconds * 1000]
        if self.ahead_ms or self.times != 1:
            args += [self.ahead_ms, self.times]
        return args

    def admission(self, reply: Sequence[int | bytes]) -> Admission:
        out = [int(x) for x in reply]
        admitted, total, retry_ms, now, estimate = out[:5]
        states = tuple(
            WindowState(limit, used, 0.0 if oldest < 0 else max(0.0, (oldest + limit.seconds * 1000 - now) / 1000))
            for limit, used, oldest in zip(self.limits, out[5::2], out[6::2], strict=True)
        )
        return Admission(
            admitted=bool(admitted),
            amount=total,
            estimate=estimate,
            retry_after_seconds=None if retry_ms < 0 else retry_ms / 1000,
            windows=states,
        )


class SlidingWindows:
    """Admit, settle and read sliding windows kept in Redis."""

    def __init__(self, redis: Redis | Scripts, estimate: Estimate = Estimate()) -> None:
        scripts = scripts_of(redis)
        self._redis = redis
        self._estimate = estimate
        self._admit = scripts.register(_ADMIT)
        self._admit_then = scripts.register(_ADMIT_THEN)
        self._settle = scripts.register(_SETTLE)

    async def admit(
        self,
        limits: Sequence[Limit],
        member: str,
        amount: int,
        *,
        max_extra: int | None = None,
        reservation_key: str | None = None,
        estimate_key: str | None = None,
        dry: bool = False,
        now_ms: int | None = None,
    ) -> Admission:
        """Admits amount (+ an estimate up to max_extra) into every window, or into none."""
        return await self.admit_ask(Ask(limits, member, amount, max_extra, reservation_key, estimate_key, dry, now_ms))

    async def admit_ask(self, ask: Ask) -> Admission:
        return ask.admission(await self._admit(keys=ask.keys(), args=ask.args(self._estimate)))

    async def admit_then(self, first: Ask, then: Ask) -> tuple[Admission, Admission | None]:
        """Admits first and, only if it was admitted, then: one atomic script, one round trip to Redis
        (a request counted against its request limits, then its tokens held)."""
        keys, args = first.keys(), first.args(self._estimate)
        replies = await self._admit_then(
            keys=[*keys, *then.keys()], args=[len(keys), len(args), *args, *then.args(self._estimate)]
        )
        admitted = first.admission(replies[0])
        return admitted, then.admission(replies[1]) if len(replies) > 1 else None

    async def settle(
        self,
        limits: Sequence[Limit],
        member: str,
        real_amount: int,
        *,
        reservation_key: str,
        estimate_key: str,
        learn_completion: int | Sequence[int] | None,
        keep: bool = False,
    ) -> tuple[bool, int]:
        """Replaces the reservation's amount with real_amount, learning the completions given; (settled, tokens
        returned). Kept, it may be settled again."""
        keys = [*_keys(limits), reservation_key, estimate_key]
        if isinstance(learn_completion, int):
            learn_completion = (learn_completion,)
        learn = ",".join(str(c) for c in learn_completion) if learn_completion else -1
        args: list[str | int] = [len(limits), member, real_amount, learn, self._estimate.samples, 1 if keep else 0]
        settled, returned = (int(x) for x in await self._settle.later(keys=keys, args=args))
        return bool(settled), returned
