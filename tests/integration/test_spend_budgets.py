"""Spend budgets in real Redis: what 64 concurrent requests on two limiters (two routers) hold, extend and
settle never passes a budget; refusals name the budget; periods roll over on the clock; failure modes."""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as redis

from services.billing.prices import Price, Prices
from services.mesh.local import LocalMesh
from services.ratelimit.budgets import Budget, micros
from services.ratelimit.decisions import TokenCaller, TokenHold
from services.ratelimit.limiter import Limiter
from services.ratelimit.rules import Rules
from services.ratelimit.spend import Spend, budget_states
from services.ratelimit.windows import Estimate, SlidingWindows
from services.runtime.errors import InvalidArgument, QuotaExceeded, Unavailable

# A prompt token costs 0.001, a completion token 0.002.
PRICES = Prices(models={"m": Price(prompt_per_1k=Decimal(1), completion_per_1k=Decimal(2))})
DAY = 86400.0
START = 1_796_083_200.0  # 2026-12-01 00:00:00 UTC


def rules(budgets: dict[str, Any] | None = None, tokens: bool = False) -> Rules:
    plan: dict[str, Any] = {"tokens": {"key": {"per_minute": 10_000_000}}} if tokens else {}
    return Rules.parse({"default_plan": "p", "plans": {"p": plan}, "budgets": budgets or {}})


class Clock:
    def __init__(self) -> None:
        self.now = START + 3600

    def __call__(self) -> float:
        return self.now


def limiter(client: redis.Redis, r: Rules, clock: Clock) -> Limiter:
    estimate = Estimate(percentile=0.9, min_samples=4, samples=16)
    return Limiter(lambda: r, SlidingWindows(client, estimate), Spend(client, lambda: PRICES, estimate), clock)


async def spent_and_held(client: redis.Redis, key: str) -> tuple[int, int]:
    keys = [k async for k in client.scan_iter(match=f"msp:*:{key}:*") if not k.endswith(b":h")]
    assert len(keys) == 1, keys
    spent, held = await client.hmget(keys[0], ["spent", "held"])  # type: ignore[misc]
    return int(spent or 0), int(held or 0)


@pytest.mark.parametrize("tokens", [False, True], ids=["spend-only", "with-token-limits"])
async def test_64_concurrent_requests_on_two_routers_never_spend_past_the_budget(
    client: redis.Redis, redis_mesh: LocalMesh, tokens: bool
) -> None:
    clock = Clock()
    r = rules(tokens=tokens)
    # Two routers, each with its own pool of connections (as open_limits makes them) to the one Redis.
    pools = [redis.BlockingConnectionPool.from_url(redis_mesh.redis_url, **redis_mesh.redis_options()) for _ in "ab"]
    routers = [limiter(redis.Redis(connection_pool=pool), r, clock) for pool in pools]
    caller = TokenCaller("acme", "key_1", key_budget=Budget.parse("2/day"))
    rng = random.Random(7)
    costs: list[Decimal] = []
    outcomes = {"served": 0, "stopped": 0, "refused": 0}

    async def one(i: int) -> None:
        lim = routers[i % 2]
        try:
            held = await lim.reserve(f"r{i}", caller, "m", 100, 400, hold=TokenHold.REQUIRED)
        except QuotaExceeded as exc:
            assert "this key's budget of 2 per day" in str(exc)
            outcomes["refused"] += 1
            return
        assert held.spend is not None and held.spend.allowance is not None
        allowance, sent, target = held.spend.allowance, 0, rng.randint(20, 400)
        while sent < target:
            step = min(rng.randint(1, 3), target - sent)
            if sent + step > allowance:
                extended = await routers[(i + sent) % 2].extend(f"r{i}", caller, "m", max(16, allowance))
                assert extended is not None and extended.allowance is not None
                allowance = extended.allowance
                if sent + step > allowance:
                    break
            sent += step
            await asyncio.sleep(0)
        outcomes["served" if sent == target else "stopped"] += 1
        await lim.settle(f"r{i}", caller, "m", 100, sent, learn=True)
        costs.append(PRICES.cost("m", 100, sent, "ROUND_CEILING"))

    await asyncio.gather(*(one(i) for i in range(64)))
    for pool in pools:
        await pool.disconnect()
    spent, held = await spent_and_held(client, "key:key_1")
    assert held == 0
    assert spent == micros(sum(costs, Decimal(0)))  # charged exactly what was delivered
    assert spent <= micros(Decimal(2))  # and never past the budget
    assert outcomes["served"] > 0 and outcomes["stopped"] + outcomes["refused"] > 0, outcomes


async def test_a_refusal_names_the_budget_and_what_is_left(client: redis.Redis) -> None:
    clock = Clock()
    lim = limiter(client, rules({"tenants": {"acme": {"amount": "0.5", "period": "month"}}}), clock)
    caller = TokenCaller("acme", "key_1")
    held = await lim.reserve("a", caller, "m", 100, 150, hold=TokenHold.REQUIRED)  # 0.1 + 0.3 held
    assert held.held and held.spend is not None and held.spend.allowance == 150
    with pytest.raises(QuotaExceeded) as refused:
        await lim.reserve("b", caller, "m", 100, 150, hold=TokenHold.REQUIRED)
    assert refused.value.error_type == "insufficient_quota" and refused.value.http_status == 429
    assert "the tenant's budget of 0.5 per month has 0.1 left" in str(refused.value)
    assert "expected to cost 0.4" in str(refused.value)
    # A guess that does not fit is not refused: it says so, and the measured counts decide.
    guess = await lim.reserve("c", caller, "m", 100, 150, hold=TokenHold.IF_ROOM)
    assert not guess.held and guess.enforced
    # Settled below the hold, the rest comes back; extending takes only what is left.
    await lim.settle("a", caller, "m", 100, 50, learn=False)
    assert await spent_and_held(client, "tenant:") == (micros(Decimal("0.2")), 0)
    again = await lim.reserve("d", caller, "m", 50, 50, hold=TokenHold.REQUIRED)  # 0.05 + 0.1
    assert again.spend is not None and again.spend.allowance == 50
    extended = await lim.extend("d", caller, "m", 1000)  # 0.5 - 0.2 spent - 0.15 held: 0.15 more
    assert extended is not None and extended.allowance == 125 and extended.left == 0  # (0.3 - 0.05) / 0.002
    full = await lim.extend("d", caller, "m", 10)
    assert full is not None and full.allowance == 125  # no room: no more


async def test_a_model_budget_applies_to_its_model_only(client: redis.Redis) -> None:
    clock = Clock()
    budgets = {"tenants": {"acme": {"models": {"m": {"amount": "0.1", "period": "day"}}}}}
    lim = limiter(client, rules(budgets), clock)
    caller = TokenCaller("acme", "key_1")
    with pytest.raises(QuotaExceeded, match="budget for this model"):
        await lim.reserve("a", caller, "m", 100, 100, hold=TokenHold.REQUIRED)
    other = await lim.reserve("b", caller, "other", 100, 100, hold=TokenHold.REQUIRED)
    assert other.spend is None


async def test_a_day_budget_starts_again_the_next_day(client: redis.Redis) -> None:
    clock = Clock()
    lim = limiter(client, rules(), clock)
    caller = TokenCaller("acme", "key_1", key_budget=Budget.parse("0.3/day"))
    await lim.reserve("a", caller, "m", 100, 100, hold=TokenHold.REQUIRED)
    await lim.settle("a", caller, "m", 100, 100, learn=False)  # 0.3 spent: nothing left today
    with pytest.raises(QuotaExceeded, match="has 0 left"):
        await lim.reserve("b", caller, "m", 1, 1, hold=TokenHold.REQUIRED)
    clock.now = START + DAY - 1
    with pytest.raises(QuotaExceeded):
        await lim.reserve("c", caller, "m", 1, 1, hold=TokenHold.REQUIRED)
    clock.now = START + DAY  # midnight UTC
    assert (await lim.reserve("d", caller, "m", 100, 100, hold=TokenHold.REQUIRED)).held
    held = await budget_states(client, Rules.budget_index_key("acme"))
    assert [(s.period, s.limit, s.spent, s.held) for s in held] == [
        ("d20261201", 300_000, 300_000, 0),
        ("d20261202", 300_000, 0, 300_000),
    ]
    assert held[0].remaining == 0 and held[1].scope == "key" and held[1].subject == "key_1"
    # A request held before midnight and settled after it is charged to the day it was held in.
    clock.now = START + DAY + 10
    await lim.settle("d", caller, "m", 100, 10, learn=False)
    periods = sorted([k async for k in client.scan_iter(match="msp:*:key:key_1:*") if not k.endswith(b":h")])
    assert [p.rsplit(b":", 1)[1] for p in periods] == [b"d20261201", b"d20261202"]
    assert await client.ttl(periods[0]) > 30 * 86400  # last period's spend stays readable a while


async def test_a_hold_never_settled_goes_back_to_its_budget_when_it_lapses(client: redis.Redis) -> None:
    r = rules()
    lim = Limiter(lambda: r, SlidingWindows(client), Spend(client, lambda: PRICES, hold_seconds=0.3), Clock())
    caller = TokenCaller("acme", "key_1", key_budget=Budget.parse("0.3/day"))
    assert (await lim.reserve("crashed", caller, "m", 100, 100, hold=TokenHold.REQUIRED)).held  # never settled
    with pytest.raises(QuotaExceeded):
        await lim.reserve("b", caller, "m", 100, 100, hold=TokenHold.REQUIRED)
    await asyncio.sleep(0.4)
    assert (await lim.reserve("c", caller, "m", 100, 100, hold=TokenHold.REQUIRED)).held
    assert await spent_and_held(client, "key:key_1") == (0, 300_000)
    await lim.settle("crashed", caller, "m", 100, 100, learn=False)  # too late: its hold went back
    await lim.settle("c", caller, "m", 100, 20, learn=False)
    assert await spent_and_held(client, "key:key_1") == (140_000, 0)


async def test_redis_away_refuses_budgeted_requests_unless_budgets_fail_open(redis_mesh: LocalMesh) -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_timeout=0.2, socket_connect_timeout=0.2)
    caller = TokenCaller("acme", "key_1", key_budget=Budget.parse("5/month"))
    closed = Limiter(lambda: rules(), SlidingWindows(dead), Spend(dead, lambda: PRICES), Clock())
    with pytest.raises(Unavailable, match="spend limits cannot be checked"):
        await closed.reserve("a", caller, "m", 10, 10)
    open_rules = rules({"failure_mode": "open"})
    opened = Limiter(lambda: open_rules, SlidingWindows(dead), Spend(dead, lambda: PRICES), Clock())
    assert (await opened.reserve("a", caller, "m", 10, 10)).spend is None
    # Budgets without a price table are never spent unbudgeted.
    unpriced = Limiter(lambda: rules(), SlidingWindows(dead))
    with pytest.raises(Unavailable, match="no price table"):
        await unpriced.reserve("a", caller, "m", 10, 10)
    await dead.aclose()


def test_budgets_are_checked_as_they_are_read() -> None:
    with pytest.raises(InvalidArgument, match="period"):
        Budget.parse("5/week")
    with pytest.raises(InvalidArgument, match="amount"):
        Budget.parse("-1/day")
    with pytest.raises(InvalidArgument, match="budgets"):
        rules({"tenants": {"acme": {"amount": "5", "period": "fortnight"}}})
    assert str(Budget.parse("20.50/day")) == "20.5/day"
    assert Budget.parse("20").period.value == "none"
