"""Settlements batched in real Redis (services/ratelimit/scripts.py): they wait at most their delay, a decision
takes every waiting one ahead of itself in one pipeline, and none is lost to a restart's empty script cache, a
broken connection or a service stopping."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as redis

from services.ratelimit.rules import Limit, Scope
from services.ratelimit.scripts import Scripts
from services.ratelimit.windows import SlidingWindows

TOKENS = [Limit(Scope.KEY, 100, 60, "test:{s}:tok:60")]
KEYS = {"estimate_key": "test:{s}:est"}


async def hold(windows: SlidingWindows, member: str, amount: int) -> bool:
    admission = await windows.admit(
        TOKENS, member, amount, max_extra=0, reservation_key=f"test:{{s}}:res:{member}", **KEYS
    )
    return admission.admitted


def settle(windows: SlidingWindows, member: str, real: int) -> asyncio.Task[tuple[bool, int]]:
    res = f"test:{{s}}:res:{member}"
    return asyncio.create_task(windows.settle(TOKENS, member, real, reservation_key=res, learn_completion=None, **KEYS))


async def used(client: redis.Redis) -> int:
    return int(await client.get("test:{s}:tok:60:s") or 0)


async def test_a_settlement_waits_its_delay_then_lands(client: redis.Redis) -> None:
    windows = SlidingWindows(Scripts(client, delay_seconds=0.2))
    assert await hold(windows, "a", 90)
    started = time.monotonic()
    landing = settle(windows, "a", 10)
    await asyncio.sleep(0.05)
    assert not landing.done() and await used(client) == 90  # waiting: the reservation counts in full
    assert await landing == (True, 80)
    assert 0.15 < time.monotonic() - started < 2
    assert await used(client) == 10


async def test_a_decision_takes_the_waiting_settlements_to_redis_ahead_of_itself(client: redis.Redis) -> None:
    windows = SlidingWindows(Scripts(client, delay_seconds=30))  # longer than the test: only the decision sends them
    assert await hold(windows, "a", 60)
    assert await hold(windows, "b", 30)
    landing = [settle(windows, "a", 5), settle(windows, "b", 5)]
    await asyncio.sleep(0.01)
    assert not any(t.done() for t in landing)
    # 60 more fit only once both settlements are in: Redis applied them first, in the same round trip.
    assert await hold(windows, "c", 60)
    assert await asyncio.gather(*landing) == [(True, 55), (True, 25)]
    assert await used(client) == 70


async def test_a_full_batch_goes_without_waiting(client: redis.Redis) -> None:
    windows = SlidingWindows(Scripts(client, delay_seconds=30, most=3))
    for member in "abc":
        assert await hold(windows, member, 10)
    results = await asyncio.wait_for(asyncio.gather(*(settle(windows, m, 1) for m in "abc")), 5)
    assert results == [(True, 9)] * 3


async def test_a_batch_after_a_restart_loads_its_scripts_again(client: redis.Redis) -> None:
    windows = SlidingWindows(Scripts(client, delay_seconds=0.01))
    assert await hold(windows, "a", 50)
    await client.script_flush()  # what a Redis restart leaves: no script loaded
    assert await asyncio.wait_for(settle(windows, "a", 20), 5) == (True, 30)
    await client.script_flush()
    settling = settle(windows, "b", 1)  # nothing held: settles nothing, but runs
    await asyncio.sleep(0)
    assert await hold(windows, "c", 10)  # the decision's pipeline meets the empty cache too
    assert await settling == (False, 0)
    assert await used(client) == 30


async def test_a_broken_connection_fails_every_call_of_its_batch() -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    windows = SlidingWindows(Scripts(dead, delay_seconds=30))
    waiting = settle(windows, "a", 1)
    await asyncio.sleep(0)
    with pytest.raises((redis.ConnectionError, OSError)):
        await hold(windows, "b", 1)
    with pytest.raises((redis.ConnectionError, OSError)):
        await waiting  # its caller retries it (the settlers do)
    await dead.aclose()


async def test_closing_sends_what_waits(client: redis.Redis) -> None:
    scripts = Scripts(client, delay_seconds=30)
    windows = SlidingWindows(scripts)
    assert await hold(windows, "a", 40)
    landing = settle(windows, "a", 4)
    await asyncio.sleep(0)
    await asyncio.wait_for(scripts.close(), 5)
    assert await landing == (True, 36)
