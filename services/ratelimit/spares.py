"""Spare admissions: the decisions of a busy key's next requests, made before they come, so that their limits
cost them no round trip to Redis, and a few requests one script between them (about a third of what the
control path adds to a unary request at concurrency 1 was that round trip, bench/reports/gateways.md).

A spare is the decision of up to `requests` requests of one key and model, made early under an id of its own:
that many requests counted in the key's request windows and as many requests' tokens (a guessed prompt and a
completion estimate each) held in its token windows, in one script, as limiter.py decides one request. It is
stamped ahead (admit.lua) by the latest moment a request may take from it, so each request it admits counts in
every window until at least a whole window after it came: the limits' upper bound stays exact, and a request
only counts a little longer than its own decision would have made it. Once nothing more may be taken and every
request that took from it has settled, it is settled once: the requests taken in place of those counted, their
real tokens in place of those held, every completion learned. Spend budgets are decided per request: where one
applies, no spare is made.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from prometheus_client import Counter
from redis.exceptions import RedisError

from services.ratelimit.decisions import Reservation, TokenCaller
from services.ratelimit.limiter import DECISIONS, TOKENS_CHARGED, TOKENS_RETURNED, Limiter
from services.ratelimit.rules import Kind, Limit
from services.ratelimit.windows import Admission, Ask, tightest
from services.runtime.errors import Unavailable

SPARES = Counter(
    "meshserve_ratelimit_spares_total",
    "Spare admissions by outcome (made; refused: no room for one) and requests taken from them.",
    ["outcome"],
)
# The most of its life a spare may be stamped ahead, as a share of the shortest window it counts in.
MOST_OF_WINDOW = 0.05


@dataclass(frozen=True)
class Spare:
    """Up to `requests` requests' decisions made ahead, each taken by a request of the same key and model that
    fits in one request's share."""

    id: str
    requests: int
    prompt_tokens: int
    max_tokens: int
    # The completion estimate held for each request, beside its prompt.
    estimate: int
    # time.monotonic() from which none may be taken any more.
    deadline: float
    count: Ask
    tokens: Ask
    counted: Admission
    held: Admission

    @property
    def share(self) -> int:
        """Tokens held for each request: its prompt and a completion estimate."""
        return self.prompt_tokens + self.estimate

    def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        return prompt_tokens <= self.prompt_tokens and max_tokens <= self.max_tokens

    def reservation(self, nth: int) -> Reservation:
        """What the nth request to take from it (1 first) holds, and the windows as its own decision left them."""
        later = self.requests - nth
        requests = tightest([replace(w, used=w.used - later) for w in self.counted.windows])
        tokens = tightest([replace(w, used=w.used - later * self.share) for w in self.held.windows])
        return Reservation(self.share, self.estimate, True, tokens, held=True, requests=requests)


class Spares:
    """Makes and settles spares on a Limiter's windows and rules; a spare lives up to life_seconds."""

    def __init__(self, limiter: Limiter, life_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._limiter = limiter
        self.life_seconds = life_seconds
        self._clock = clock

    def _ahead_ms(self, limits: Sequence[Limit]) -> int:
        shortest = min(limit.seconds for limit in limits)
        return int(min(self.life_seconds, shortest * MOST_OF_WINDOW) * 1000)

    async def make(
        self, caller: TokenCaller, model: str, requests: int, prompt_tokens: int, max_tokens: int
    ) -> Spare | None:
        """A spare of `requests` requests of caller on model of up to these counts, each holding its prompt and a
        completion estimate (as limiter.py estimates one request's); None where there is no room for it, Redis
        failed (each request's own decision says what that means), or a spend budget applies."""
        rules = self._limiter.rules
        if rules.budgets(caller.tenant, model, caller.key_id, caller.key_budget):
            return None
        limits = rules.tokens(caller.tenant, caller.key_id, caller.key_tokens_per_minute)
        _, count = self._limiter.request_ask(caller.descriptors(model), requests)
        ahead = self._ahead_ms([*limits, *count.limits]) if limits and count.limits else 0
        if ahead <= 0:
            return None
        spare_id = f"spare-{secrets.token_hex(8)}"
        count = replace(
            count,
            member=spare_id,
            reservation_key=rules.reservation_key(caller.tenant, f"{spare_id}:count"),
            ahead_ms=ahead,
        )
        tokens = Ask(
            limits,
            spare_id,
            requests * prompt_tokens,
            max_extra=max_tokens,
            reservation_key=rules.reservation_key(caller.tenant, spare_id),
            estimate_key=rules.estimate_key(caller.tenant, caller.key_id, model),
            ahead_ms=ahead,
            times=requests,
        )
        sent = self._clock()
        try:
            counted, held = await self._limiter.windows.admit_then(count, tokens)
        except (RedisError, OSError):
            return None
        # Taken no later than half its life after it was asked for: the script ran after that, and stamped it a
        # whole life ahead of its own clock.
        deadline = sent + ahead / 2000
        if not counted.admitted or held is None or not held.admitted:
            SPARES.labels("refused").inc()
            if counted.admitted:
                await self._settle(count, 0, ())
            return None
        SPARES.labels("made").inc()
        return Spare(
            spare_id, requests, prompt_tokens, max_tokens, held.estimate, deadline, count, tokens, counted, held
        )

    def usable(self, spare: Spare) -> bool:
        return self._clock() < spare.deadline

    @staticmethod
    def taken() -> None:
        """A request took its decision from a spare: counted and its tokens held, as its own decision does."""
        SPARES.labels("taken").inc()
        DECISIONS.labels(Kind.REQUESTS.value, "admitted").inc()
        DECISIONS.labels(Kind.TOKENS.value, "admitted").inc()

    async def settle(
        self, spare: Spare, taken: int | None, tokens: int, completions: Sequence[int], final: bool
    ) -> None:
        """Settles a spare once nothing more may be taken from it: `taken` requests in place of those counted
        (None: done already); `tokens` in place of those held, kept to be settled again unless final (its
        requests still running hold their shares), the completions learned. Unavailable while Redis is away (the
        caller retries)."""
        try:
            outcomes = await asyncio.gather(
                *(() if taken is None else (self._settle(spare.count, taken, ()),)),
                self._settle(spare.tokens, tokens, completions, keep=not final),
            )
        except (RedisError, OSError) as exc:
            raise Unavailable(f"a spare admission could not be settled: {exc}") from exc
        returned = outcomes[-1][1]
        if returned >= 0:
            TOKENS_RETURNED.inc(returned)
        else:
            TOKENS_CHARGED.inc(-returned)

    async def _settle(self, ask: Ask, real: int, completions: Sequence[int], keep: bool = False) -> tuple[bool, int]:
        assert ask.reservation_key is not None
        return await self._limiter.windows.settle(
            ask.limits,
            ask.member,
            real,
            reservation_key=ask.reservation_key,
            estimate_key=ask.estimate_key or "",
            learn_completion=completions,
            keep=keep,
        )
