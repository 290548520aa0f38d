"""Spare admissions in real Redis (services/ratelimit/spares.py, services/router/spares.py): a busy key's requests
take decisions made ahead of them, and the limits stay exact: never more than a limit admits, never fewer from
one router, each request counted a whole window after it came, every token settled and every completion
learned."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as redis

from services.ratelimit.decisions import TokenCaller
from services.ratelimit.limiter import Limiter
from services.ratelimit.rules import Limit, Rules, Scope
from services.ratelimit.scripts import Scripts
from services.ratelimit.spares import SPARES, Spares
from services.ratelimit.windows import Ask, Estimate, SlidingWindows
from services.router.accounting import HOLD_IF_ROOM
from services.router.caller import Caller
from services.router.limits import LocalTokenBudget
from services.runtime.errors import ResourceExhausted

CALLER = Caller(tenant="acme", key_id="key_1", allowed_models=None)


def rules(requests_per_minute: int, tokens_per_minute: int = 100_000) -> Rules:
    plan = {
        "requests": {"key": {"per_minute": requests_per_minute}},
        "tokens": {"key": {"per_minute": tokens_per_minute}},
    }
    return Rules.parse({"default_plan": "p", "plans": {"p": plan}})


def budget_over(client: redis.Redis, limits: Rules, life: float = 0.2) -> tuple[LocalTokenBudget, SlidingWindows]:
    windows = SlidingWindows(Scripts(client), Estimate(percentile=0.5, min_samples=1, samples=64))
    limiter = Limiter(lambda: limits, windows)
    return LocalTokenBudget(limiter, spares=Spares(limiter, life)), windows


async def used(windows: SlidingWindows, limits: Rules) -> tuple[int, int]:
    """(requests, tokens) in the key's minute windows now."""
    requests = limits.requests(Scope.KEY, "acme", key_id="key_1")
    tokens = limits.tokens("acme", "key_1")
    counted = await windows.admit(requests, "", 0, dry=True)
    held = await windows.admit(tokens, "", 0, dry=True)
    return counted.windows[0].used, held.windows[0].used


def spares(outcome: str) -> float:
    return SPARES.labels(outcome)._value.get()


async def test_an_admission_stamped_ahead_counts_until_a_window_after_its_latest_use(client: redis.Redis) -> None:
    windows = SlidingWindows(client)
    window = [Limit(Scope.KEY, 1, 10, "test:{s}:w:10")]
    assert (await windows.admit_ask(Ask(window, "spare", 1, now_ms=1_000, ahead_ms=500))).admitted
    # Unstamped it would leave at 11,000: taken as late as 1,500, it counts until 11,500.
    for now, count in ((11_200, 1), (11_499, 1), (11_501, 0)):
        assert (await windows.admit(window, "", 0, dry=True, now_ms=now)).windows[0].used == count, now
    # A later admission never shortens the life of the keys an admission stamped ahead needs.
    stamped = [Limit(Scope.KEY, 10, 1, "test:{s}:w:1")]
    assert (await windows.admit_ask(Ask(stamped, "a", 1, ahead_ms=800))).admitted
    assert (await windows.admit(stamped, "b", 1)).admitted
    assert await client.pttl("test:{s}:w:1:s") > 1_500 and await client.pttl("test:{s}:w:1:z") > 1_500


async def test_a_busy_keys_requests_take_decisions_made_ahead_and_never_pass_its_limit(client: redis.Redis) -> None:
    limits = rules(20)
    # A spare lives long enough here that a slow, busy host cannot let it lapse between two requests.
    budget, windows = budget_over(client, limits, life=5.0)
    taken = spares("taken")
    admitted, refused = 0, 0
    for i in range(30):
        try:
            await budget.reserve(f"r{i}", CALLER, "m", 10, 5, count_request=True, hold=HOLD_IF_ROOM)
        except ResourceExhausted as exc:
            refused += 1
            assert "20 requests per 60 s per key" in str(exc)
        else:
            admitted += 1
            budget.settle(f"r{i}", CALLER, "m", 9, 3, "completed")
        await asyncio.sleep(0.01)
    assert (admitted, refused) == (20, 10)
    assert spares("taken") - taken >= 10  # most decisions were made ahead
    await budget.close()
    # Every spare settled: exactly the requests admitted counted, exactly their real tokens held.
    assert await used(windows, limits) == (20, 20 * 12)
    learned = await client.lrange(limits.estimate_key("acme", "key_1", "m"), 0, -1)
    assert len(learned) == 20 and set(learned) == {b"3"}


async def test_64_concurrent_requests_get_exactly_the_limit_from_one_router(client: redis.Redis) -> None:
    limits = rules(40)
    budget, windows = budget_over(client, limits)
    # The key comes often: a spare is made after its second request.
    for i in range(2):
        await budget.reserve(f"w{i}", CALLER, "m", 10, 5, count_request=True, hold=HOLD_IF_ROOM)
        budget.settle(f"w{i}", CALLER, "m", 10, 5, "completed")

    async def one(i: int) -> bool:
        try:
            await budget.reserve(f"r{i}", CALLER, "m", 10, 5, count_request=True, hold=HOLD_IF_ROOM)
        except ResourceExhausted:
            return False
        budget.settle(f"r{i}", CALLER, "m", 10, 5, "completed")
        return True

    results = await asyncio.gather(*(one(i) for i in range(64)))
    assert results.count(True) == 38
    await budget.close()
    assert await used(windows, limits) == (40, 40 * 15)


async def test_a_spare_nobody_takes_in_time_gives_its_room_back(client: redis.Redis) -> None:
    limits = rules(100)
    budget, windows = budget_over(client, limits, life=0.2)
    for i in range(3):
        await budget.reserve(f"r{i}", CALLER, "m", 10, 5, count_request=True, hold=HOLD_IF_ROOM)
        budget.settle(f"r{i}", CALLER, "m", 10, 5, "completed")
    deadline = time.monotonic() + 5
    # The spare made after the second request was taken by the third; the one made after the third goes unused.
    while await used(windows, limits) != (3, 45):
        assert time.monotonic() < deadline, await used(windows, limits)
        await asyncio.sleep(0.05)
    await budget.close()


async def test_a_request_whose_measured_counts_exceed_its_share_holds_them_under_its_own_id(
    client: redis.Redis,
) -> None:
    limits = rules(100)
    budget, windows = budget_over(client, limits, life=5.0)
    made = spares("made")
    for i in range(2):
        await budget.reserve(f"w{i}", CALLER, "m", 10, 5, count_request=True, hold=HOLD_IF_ROOM)
        budget.settle(f"w{i}", CALLER, "m", 10, 5, "completed")
    deadline = time.monotonic() + 5
    while spares("made") == made:  # the spare comes
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    taken = spares("taken")
    await budget.reserve("big", CALLER, "m", 10, 5, count_request=True, hold=HOLD_IF_ROOM)
    assert spares("taken") == taken + 1
    # The replica measured 200 prompt tokens: reserved in place of the share, under the request's own id.
    await budget.reserve("big", CALLER, "m", 200, 5)
    budget.settle("big", CALLER, "m", 200, 4, "completed")
    await budget.close()
    assert await used(windows, limits) == (3, 2 * 15 + 204)


async def test_no_spare_is_made_where_a_spend_budget_applies(client: redis.Redis) -> None:
    plan = {"requests": {"key": {"per_minute": 100}}, "tokens": {"key": {"per_minute": 100_000}}}
    budgeted = Rules.parse(
        {"default_plan": "p", "plans": {"p": plan}, "budgets": {"tenants": {"acme": {"amount": "10"}}}}
    )
    limiter = Limiter(lambda: budgeted, SlidingWindows(Scripts(client)))
    made = spares("made")
    assert await Spares(limiter, 0.2).make(TokenCaller("acme", "key_1"), "m", 4, 10, 5) is None
    assert spares("made") == made
    assert await Spares(Limiter(lambda: rules(100), SlidingWindows(Scripts(client))), 0.2).make(
        TokenCaller("acme", "key_1"), "m", 4, 10, 5
    )
