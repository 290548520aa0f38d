"""A service's warm-up waits for its Redis (slow to start, or slow to shake hands on a busy machine) instead of
failing, and gives up with Redis's own error past its patience."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as redis

from services.runtime import redis_tls


class Flaky:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.pings = 0

    async def ping(self) -> bool:
        self.pings += 1
        if self.pings <= self.failures:
            raise (redis.TimeoutError if self.pings % 2 else redis.ConnectionError)("not yet")
        return True


async def test_it_waits_until_redis_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(redis_tls.asyncio, "sleep", sleep)
    client: Any = Flaky(failures=3)
    await redis_tls.answering(client)
    assert client.pings == 4 and len(slept) == 3


async def test_past_its_patience_redis_error_is_raised() -> None:
    client: Any = Flaky(failures=10**6)
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        await redis_tls.answering(client, patience_seconds=0)
    assert client.pings == 1
