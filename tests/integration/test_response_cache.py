"""The response cache on a real Redis: answers kept for a TTL, within a memory bound, least recently used first."""

from __future__ import annotations

import redis.asyncio as redis

from services.mesh.local import LocalMesh
from services.router import cache, metrics
from services.router.cache import Answer, Plan, ResponseCache

DONE = b"data: [DONE]\n\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def plan(n: int, model: str = "m") -> Plan:
    fields = {"model": model, "prompt": f"prompt {n}", "temperature": 0}
    return Plan(cache.key_of(model, "acme", "v1", 2, False, fields), model, True, True)


def answer(n: int, size: int = 1000) -> Answer:
    return Answer(f"cmpl-{n}", (b"x" * size,), 5, 7)


def evictions(model: str) -> float:
    return metrics.CACHE_EVICTIONS.labels(model)._value.get()


async def test_an_answer_kept_is_read_back_until_its_ttl(client: redis.Redis) -> None:
    clock = Clock()
    answers = ResponseCache(client, ttl_seconds=60, max_bytes=1 << 20, max_entry_bytes=1 << 16, clock=clock)
    assert await answers.get(plan(1)) is None
    answers.keep(plan(1), answer(1))
    await answers.settled()
    assert await answers.get(plan(1)) == answer(1)
    assert 0 < await client.ttl(plan(1).key) <= 60


async def test_the_cache_stays_within_its_bound_and_evicts_the_least_recently_used(client: redis.Redis) -> None:
    clock = Clock()
    # Room for three answers of about 1 kB (each is kept as JSON, a little over its events' size).
    answers = ResponseCache(client, ttl_seconds=600, max_bytes=3500, max_entry_bytes=2000, clock=clock)
    before = evictions("bounded")
    for n in range(3):
        clock.now += 1
        answers.keep(plan(n, "bounded"), answer(n))
        await answers.settled()
    clock.now += 1
    assert await answers.get(plan(0, "bounded")) is not None  # used last: now the most recently used
    for n in (3, 4):
        clock.now += 1
        answers.keep(plan(n, "bounded"), answer(n))
        await answers.settled()
    kept = [n for n in range(5) if await answers.get(plan(n, "bounded")) is not None]
    assert kept == [0, 3, 4]
    assert evictions("bounded") - before == 2
    assert int(await client.get(cache.HELD)) <= 3500
    assert metrics.CACHE_HELD_BYTES._value.get() <= 3500


async def test_an_answer_over_the_entry_bound_is_not_kept(client: redis.Redis) -> None:
    answers = ResponseCache(client, ttl_seconds=60, max_bytes=1 << 20, max_entry_bytes=500)
    answers.keep(plan(1), answer(1, size=501))
    await answers.settled()
    assert await answers.get(plan(1)) is None


async def test_expired_answers_are_forgotten_without_counting_as_evictions(client: redis.Redis) -> None:
    clock = Clock()
    answers = ResponseCache(client, ttl_seconds=60, max_bytes=1 << 20, max_entry_bytes=1 << 16, clock=clock)
    before = evictions("ageing")
    answers.keep(plan(1, "ageing"), answer(1))
    await answers.settled()
    held = int(await client.get(cache.HELD))
    clock.now += 61
    answers.keep(plan(2, "ageing"), answer(2, size=10))
    await answers.settled()
    assert int(await client.get(cache.HELD)) < held
    assert await client.zscore(cache.RECENCY, plan(1, "ageing").key) is None
    assert evictions("ageing") == before


async def test_redis_away_is_a_miss_not_a_failure(redis_mesh: LocalMesh) -> None:
    away = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    answers = ResponseCache(away, ttl_seconds=60, max_bytes=1 << 20, max_entry_bytes=1 << 16)
    errors = metrics.CACHE_LOOKUPS.labels("m", "error")._value.get()
    assert await answers.get(plan(1)) is None
    answers.keep(plan(1), answer(1))
    await answers.settled()
    assert metrics.CACHE_LOOKUPS.labels("m", "error")._value.get() == errors + 1
    await away.aclose()
