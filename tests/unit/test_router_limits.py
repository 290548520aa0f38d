"""The router's own limits (services/router/limits.py): the limiter's reservation as the pipeline keeps it,
and settlement off the request's path, retried while Redis is away."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from services.ratelimit.decisions import Reservation, TokenCaller, TokenHold
from services.ratelimit.rules import Limit, Scope
from services.ratelimit.windows import WindowState
from services.router.accounting import HOLD_IF_ROOM, Window
from services.router.caller import Caller
from services.router.limits import LocalTokenBudget, reserved
from services.runtime.errors import InvalidArgument, ResourceExhausted, Unavailable

CALLER = Caller(tenant="acme", key_id="key_1", allowed_models=None, tokens_per_minute=500, requests_per_minute=7)
PER_MINUTE = WindowState(Limit(Scope.KEY, 40, 60, "k"), used=39, reset_seconds=12.5)
TOKENS = WindowState(Limit(Scope.TENANT, 5000, 60, "t"), used=1200, reset_seconds=3.0)


class Limiter:
    """Answers as told and remembers what it was asked."""

    def __init__(self, reservation: Reservation | None = None, settle_failures: list[Exception] | None = None):
        self.reservation = reservation
        self.failures = list(settle_failures or [])
        self.calls: list[tuple[Any, ...]] = []

    async def reserve(self, *args: Any, **kwargs: Any) -> Reservation:
        self.calls.append(("reserve", args, kwargs))
        if self.reservation is None:
            raise ResourceExhausted("rate limit exceeded", retry_after_seconds=3)
        return self.reservation

    async def settle(self, *args: Any) -> tuple[bool, int]:
        self.calls.append(("settle", args))
        if self.failures:
            raise self.failures.pop(0)
        return True, 10


def test_a_held_reservation_covers_its_counts_and_reports_both_windows() -> None:
    kept = reserved(Reservation(150, 50, True, TOKENS, held=True, requests=PER_MINUTE))
    assert kept.covers and kept.held
    assert kept.windows == (Window("requests", 40, 1, 12.5), Window("tokens", 5000, 3800, 3.0))


def test_a_guess_that_did_not_fit_covers_nothing_and_an_unenforced_one_everything() -> None:
    assert not reserved(Reservation(0, 50, True, TOKENS, requests=PER_MINUTE)).covers
    unenforced = reserved(Reservation(150, 50, False, requests=None))
    assert unenforced.covers and not unenforced.held and unenforced.windows == ()


async def test_reserve_passes_the_caller_and_the_hold_to_the_limiter() -> None:
    limiter = Limiter(Reservation(150, 50, True, TOKENS, held=True))
    budget = LocalTokenBudget(limiter)  # type: ignore[arg-type]
    await budget.reserve("r1", CALLER, "m", 100, 50, count_request=True, hold=HOLD_IF_ROOM)
    [(_, args, kwargs)] = limiter.calls
    assert args == ("r1", TokenCaller("acme", "key_1", 500, 7), "m", 100, 50)
    assert kwargs == {"count_request": True, "hold": TokenHold.IF_ROOM}


async def test_a_refusal_is_the_callers() -> None:
    with pytest.raises(ResourceExhausted):
        await LocalTokenBudget(Limiter(None)).reserve("r1", CALLER, "m", 100, 50)  # type: ignore[arg-type]


async def test_settlement_is_retried_while_redis_is_away_and_learns_only_from_completions() -> None:
    limiter = Limiter(settle_failures=[Unavailable("redis down"), Unavailable("redis down")])
    budget = LocalTokenBudget(limiter)  # type: ignore[arg-type]
    budget.settle("r1", CALLER, "m", 100, 20, "completed")
    budget.settle("r2", CALLER, "m", 100, 5, "cancelled")
    await asyncio.wait_for(budget.close(), 5)
    settled = [args for kind, args in limiter.calls if kind == "settle"]
    assert [a[0] for a in settled].count("r1") + [a[0] for a in settled].count("r2") == 4  # 2 failures, 2 settled
    assert {(a[0], a[-1]) for a in settled} == {("r1", True), ("r2", False)}


async def test_a_settlement_the_limiter_refuses_is_not_retried() -> None:
    limiter = Limiter(settle_failures=[InvalidArgument("bad")])
    budget = LocalTokenBudget(limiter)  # type: ignore[arg-type]
    budget.settle("r1", CALLER, "m", 1, 1, "failed")
    await asyncio.wait_for(budget.close(), 5)
    assert len(limiter.calls) == 1


class FakeSpares:
    """Makes every spare asked for (remembering how many requests each decides), never usable past a deadline."""

    life_seconds = 0.2

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.made: list[int] = []
        self.settled: list[tuple[int | None, int, tuple[int, ...], bool]] = []

    async def make(self, caller: TokenCaller, model: str, requests: int, prompt: int, most: int) -> Any:
        from services.ratelimit.spares import Spare
        from services.ratelimit.windows import Admission, Ask

        self.made.append(requests)
        counted = Admission(True, requests, 0, 0.0, (replace(PER_MINUTE, used=30),))
        held = Admission(True, requests * 15, 5, 0.0, (replace(TOKENS, used=1000),))
        ask = Ask([], "s", 0)
        return Spare("s", requests, prompt, most, 5, self.clock[0] + 0.1, ask, ask, counted, held)

    def usable(self, spare: Any) -> bool:
        return bool(self.clock[0] < spare.deadline)

    @staticmethod
    def taken() -> None:
        pass

    async def settle(self, spare: Any, taken: int | None, tokens: int, completions: Any, final: bool) -> None:
        self.settled.append((taken, tokens, tuple(completions), final))


async def test_a_key_that_comes_often_gets_spares_sized_to_its_pace_and_each_settles_once() -> None:
    from services.router.spares import SpareKeeper

    clock = [100.0]
    fake = FakeSpares(clock)
    settled: list[str] = []

    def settle(name: str, call: Any) -> asyncio.Task[None]:
        settled.append(name)
        return asyncio.get_running_loop().create_task(call())

    keeper = SpareKeeper(fake, settle, clock=lambda: clock[0])  # type: ignore[arg-type]
    who = TokenCaller("acme", "key_1")
    keeper.decided(who, "m", 10, 5)
    await asyncio.sleep(0)
    assert fake.made == []  # seen once: not yet a key that comes often
    clock[0] += 0.01
    keeper.decided(who, "m", 10, 5)
    await asyncio.sleep(0)
    assert len(fake.made) == 1
    # Each taker's windows are as its own decision would have left them: the spare's later requests not yet in.
    first = keeper.take("r1", who, "m", 10, 5)
    assert first is not None and first.requests is not None and first.tightest is not None
    assert (first.requests.used, first.tightest.used) == (30 - (fake.made[0] - 1), 1000 - (fake.made[0] - 1) * 15)
    assert keeper.take("r2", who, "m", 11, 5) is None  # a larger prompt than the spare's: decided on its own
    await asyncio.sleep(0)
    # Closed by the request that did not fit: the untaken room back at once, the taker's share held until it settles.
    assert fake.settled == [(1, 15, (), False)]
    assert keeper.settle("r1", 10, 3, learn=True) and not keeper.settle("r2", 10, 3, learn=True)
    await asyncio.sleep(0)
    assert fake.settled[1:] == [(None, 13, (3,), True)]
    clock[0] += 1.0  # a key that went quiet gets no spare
    keeper.decided(who, "m", 10, 5)
    await asyncio.sleep(0)
    assert len(fake.made) == 1
    await keeper.close()
