"""Sliding windows in real Redis: exact limits, all-or-nothing admission, reservations, estimates, settlement."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from services.mesh.local import LocalMesh, MeshOptions
from services.ratelimit.rules import Limit, Scope
from services.ratelimit.windows import Ask, Estimate, SlidingWindows


@pytest.fixture(scope="module")
def redis_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    m = LocalMesh(MeshOptions(state_dir=tmp_path_factory.mktemp("rl-redis"), model="m", model_store=Path("unused")))
    try:
        m.start_redis()
        yield m
    finally:
        m.stop()


@pytest.fixture
async def windows(redis_mesh: LocalMesh) -> AsyncIterator[SlidingWindows]:
    client = redis.Redis.from_url(redis_mesh.redis_url, **redis_mesh.redis_options())
    await client.flushdb()
    yield SlidingWindows(client, Estimate(percentile=0.9, min_samples=4, samples=8))
    await client.aclose()


def per(limit: int, seconds: int, name: str = "w") -> Limit:
    return Limit(Scope.KEY, limit, seconds, f"test:{{t}}:{name}:{seconds}")


async def test_a_window_slides_instead_of_resetting_at_a_boundary(windows: SlidingWindows) -> None:
    second = [per(10, 1)]
    # Ten requests late in one clock second...
    for i in range(10):
        assert (await windows.admit(second, f"r{i}", 1, now_ms=1_990)).admitted
    # ...and none just after the boundary, where a fixed window would admit ten more.
    late = await windows.admit(second, "r10", 1, now_ms=2_010)
    assert not late.admitted
    assert late.retry_after_seconds == pytest.approx(0.98)
    assert late.windows[0].remaining == 0
    assert not (await windows.admit(second, "r11", 1, now_ms=2_989)).admitted
    # One second after they were admitted, all ten places are free again, and no more.
    again = [await windows.admit(second, f"s{i}", 1, now_ms=2_990) for i in range(11)]
    assert [a.admitted for a in again] == [True] * 10 + [False]


async def test_admission_is_all_or_nothing_across_windows(windows: SlidingWindows) -> None:
    small, large = per(1, 60, "small"), per(100, 60, "large")
    assert (await windows.admit([small, large], "a", 1, now_ms=1_000)).admitted
    refused = await windows.admit([small, large], "b", 1, now_ms=1_001)
    assert not refused.admitted
    # The large window did not count the refused request.
    assert [w.used for w in refused.windows] == [1, 1]
    assert (await windows.admit([large], "c", 1, now_ms=1_002)).windows[0].used == 2


async def test_concurrent_admissions_never_pass_the_limit(windows: SlidingWindows) -> None:
    limit = [per(25, 60)]
    results = await asyncio.gather(*(windows.admit(limit, f"r{i}", 1) for i in range(64)))
    assert sum(r.admitted for r in results) == 25


async def test_a_reservation_estimates_from_history_and_settles_to_the_real_count(windows: SlidingWindows) -> None:
    tokens = [per(1_000, 60)]
    keys = {"reservation_key": "test:{t}:res:1", "estimate_key": "test:{t}:est"}
    first = await windows.admit(tokens, "1", 20, max_extra=200, now_ms=1_000, **keys)
    assert (first.admitted, first.amount, first.estimate) == (True, 220, 200)
    # A cancelled stream: 20 prompt + 7 generated; 193 tokens come back, and it does not teach the estimate.
    settled = await windows.settle(tokens, "1", 27, learn_completion=None, **keys)
    assert settled == (True, 193)
    assert await windows.settle(tokens, "1", 27, learn_completion=None, **keys) == (False, 0)
    state = await windows.admit(tokens, "", 0, dry=True, now_ms=1_001)
    assert state.windows[0].used == 27
    # Completed requests teach it: the 90th percentile of the last completions, never above max_tokens.
    for i, completion in enumerate([10, 12, 11, 30]):
        res = {"reservation_key": f"test:{{t}}:res:h{i}", "estimate_key": keys["estimate_key"]}
        await windows.admit(tokens, f"h{i}", 5, max_extra=200, now_ms=1_002, **res)
        await windows.settle(tokens, f"h{i}", 5 + completion, learn_completion=completion, **res)
    learned = await windows.admit(tokens, "2", 5, max_extra=200, now_ms=1_003, **keys)
    assert learned.estimate == 30
    capped = await windows.admit(tokens, "3", 5, max_extra=16, now_ms=1_004, **keys)
    assert capped.estimate == 16


async def test_a_reservation_never_settled_leaves_the_window_when_it_ends(windows: SlidingWindows) -> None:
    tokens = [per(100, 60)]
    keys = {"reservation_key": "test:{t}:res:x", "estimate_key": "test:{t}:est"}
    assert (await windows.admit(tokens, "x", 90, max_extra=0, now_ms=1_000, **keys)).admitted
    refused = await windows.admit(tokens, "y", 20, max_extra=0, now_ms=30_000)
    assert not refused.admitted
    assert refused.retry_after_seconds == pytest.approx(31.0)
    assert (await windows.admit(tokens, "y", 20, max_extra=0, now_ms=61_001)).admitted


async def test_a_request_larger_than_the_limit_never_fits(windows: SlidingWindows) -> None:
    refused = await windows.admit([per(100, 60)], "big", 50, max_extra=80)
    assert not refused.admitted
    assert refused.retry_after_seconds is None


async def test_a_reservation_admitted_again_replaces_the_one_it_holds(windows: SlidingWindows) -> None:
    tokens = [per(100, 60)]
    keys = {"reservation_key": "test:{t}:res:r", "estimate_key": "test:{t}:est:r"}
    # An estimate held while the prompt renders, then the exact count in its place: the window holds only that.
    assert (await windows.admit(tokens, "r", 60, max_extra=0, now_ms=1_000, **keys)).admitted
    exact = await windows.admit(tokens, "r", 70, max_extra=0, now_ms=1_001, **keys)
    assert exact.admitted and exact.windows[0].used == 70  # 60 + 70 would not fit; 70 alone does
    assert (await windows.admit(tokens, "r", 20, max_extra=0, now_ms=1_002, **keys)).windows[0].used == 20
    assert await windows.settle(tokens, "r", 25, learn_completion=None, **keys) == (True, -5)
    assert (await windows.admit(tokens, "", 0, dry=True, now_ms=1_003)).windows[0].used == 25
    # A replacement that does not fit is refused and leaves nothing held for the id.
    keys2 = {"reservation_key": "test:{t}:res:q", "estimate_key": "test:{t}:est:r"}
    assert (await windows.admit(tokens, "q", 50, max_extra=0, now_ms=1_004, **keys2)).admitted
    assert not (await windows.admit(tokens, "q", 80, max_extra=0, now_ms=1_005, **keys2)).admitted
    assert (await windows.admit(tokens, "", 0, dry=True, now_ms=1_006)).windows[0].used == 25
    assert await windows.settle(tokens, "q", 10, learn_completion=None, **keys2) == (False, 0)


async def test_a_count_then_a_hold_is_one_script_and_a_refused_count_holds_nothing(windows: SlidingWindows) -> None:
    requests, tokens = [per(2, 60, "req")], [per(100, 60, "tok")]
    keys = {"reservation_key": "test:{t}:res:a", "estimate_key": "test:{t}:est:a"}

    def hold(member: str) -> Ask:
        return Ask(tokens, member, 30, max_extra=0, reservation_key=f"test:{{t}}:res:{member}", now_ms=1_000)

    for member in ("a", "b"):
        counted, held = await windows.admit_then(Ask(requests, member, 1, now_ms=1_000), hold(member))
        assert counted.admitted and held is not None and held.admitted
    assert held.windows[0].used == 60 and counted.windows[0].used == 2
    # The third is over the request limit: refused, and its tokens are not held.
    refused, untouched = await windows.admit_then(Ask(requests, "c", 1, now_ms=1_001), hold("c"))
    assert not refused.admitted and untouched is None
    assert (await windows.admit(tokens, "", 0, dry=True, now_ms=1_002)).windows[0].used == 60
    # A hold that does not fit is refused alone: the request stays counted, as two calls would have left it.
    big = Ask(tokens, "d", 50, max_extra=0, now_ms=2_000, **keys)
    counted, held = await windows.admit_then(Ask([per(5, 60, "req2")], "d", 1, now_ms=2_000), big)
    assert counted.admitted and held is not None and not held.admitted
    assert (await windows.admit([per(5, 60, "req2")], "", 0, dry=True, now_ms=2_001)).windows[0].used == 1


async def test_the_limiter_counts_a_request_and_holds_its_tokens_in_one_round_trip(windows: SlidingWindows) -> None:
    from services.ratelimit.decisions import TokenCaller, TokenHold
    from services.ratelimit.limiter import Limiter
    from services.ratelimit.rules import Rules

    rules = Rules.parse(
        {
            "default_plan": "p",
            "plans": {"p": {"requests": {"key": {"per_minute": 1}}, "tokens": {"key": {"per_minute": 500}}}},
        }
    )
    scripts: list[str] = []
    for name in ("_admit", "_admit_then"):
        script = getattr(windows, name)

        async def counted(*args: object, _script: object = script, _name: str = name, **kwargs: object) -> object:
            scripts.append(_name)
            return await _script(*args, **kwargs)  # type: ignore[operator]

        setattr(windows, name, counted)
    limiter = Limiter(lambda: rules, windows)
    caller = TokenCaller("acme", "key_1")
    held = await limiter.reserve("r1", caller, "m", 40, 60, count_request=True, hold=TokenHold.IF_ROOM)
    assert held.held and held.reserved_tokens == 100 and held.requests is not None and held.requests.remaining == 0
    assert scripts == ["_admit_then"]
    with pytest.raises(Exception, match="rate limit exceeded"):
        await limiter.reserve("r2", caller, "m", 40, 60, count_request=True, hold=TokenHold.IF_ROOM)
    assert scripts == ["_admit_then", "_admit_then"]
    assert (await limiter.budget(caller))[0].used == 100  # the refused request held nothing
