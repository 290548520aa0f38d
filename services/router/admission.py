"""Backpressure: requests in flight per model version up to its replicas' capacity, then a bounded queue.

When the queue is full the request is refused at once with a retry delay derived from the queue, instead
of piling work onto engines that cannot start it. Imports no gRPC.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from prometheus_client import Gauge

from services.runtime.errors import ResourceExhausted, Unavailable

QUEUE_DEPTH = Gauge(
    "meshserve_router_queue_depth",
    "Requests waiting for a free replica slot (the autoscaling signal).",
    ["model", "version"],
)
IN_FLIGHT = Gauge("meshserve_router_in_flight", "Requests generating on replicas.", ["model", "version"])

# Seconds a client is told to wait when every replica of the model is out of rotation.
NO_REPLICA_RETRY_SECONDS = 2.0


@dataclass
class _Line:
    in_flight: int = 0
    # Waiters let in whose tasks have not resumed yet: their slots are taken.
    granted: int = 0
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    # Moving average of how long a request holds its slot, for the retry delay.
    hold_seconds: float = 1.0


Key = tuple[str, str]  # (model, version)


class Admission:
    """Slots per model version, as many as its replicas' capacity, and a bounded wait for one."""

    def __init__(
        self, queue_size: int, queue_timeout_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._queue_size = queue_size
        self._timeout = queue_timeout_seconds
        self._clock = clock
        self._lines: dict[Key, _Line] = {}

    def depth(self, key: Key) -> int:
        line = self._lines.get(key)
        return len(line.waiters) if line is not None else 0

    def expected_wait(self, key: Key, capacity: int) -> float:
        """Seconds a request let in now would wait for a slot: 0 with one free, infinite with the queue full
        (it would be refused), else the queue ahead over the rate slots free up."""
        line = self._lines.get(key)
        if line is None or (line.in_flight + line.granted < capacity and not line.waiters):
            return 0.0
        if len(line.waiters) >= self._queue_size or capacity <= 0:
            return math.inf
        return (len(line.waiters) + 1) * line.hold_seconds / capacity

    def _retry_after(self, line: _Line, capacity: int) -> float:
        # The queue ahead drains capacity requests per average hold time.
        return max(1.0, min(60.0, (len(line.waiters) + 1) * line.hold_seconds / max(1, capacity)))

    @asynccontextmanager
    async def slot(
        self, key: Key, capacity: Callable[[], int], vetted: Callable[[], Awaitable[None]] | None = None
    ) -> AsyncIterator[None]:
        """Holds one slot of key while the body runs; capacity() is read on every admission decision.
        vetted (the request's own limits) is awaited before the request would wait: it raises to refuse."""
        line = self._lines.setdefault(key, _Line())
        cap = self._capacity(key, capacity)
        if vetted is not None and (line.in_flight + line.granted >= cap or line.waiters):
            await vetted()
            cap = self._capacity(key, capacity)
        if line.in_flight + line.granted >= cap or line.waiters:
            if len(line.waiters) >= self._queue_size:
                raise ResourceExhausted(
                    f"{key[0]} version {key[1]} is at capacity "
                    f"({line.in_flight} generating, {len(line.waiters)} queued)",
                    retry_after_seconds=self._retry_after(line, cap),
                )
            await self._wait(key, line, capacity)
        line.in_flight += 1
        IN_FLIGHT.labels(*key).inc()
        started = self._clock()
        try:
            yield
        finally:
            line.in_flight -= 1
            IN_FLIGHT.labels(*key).dec()
            line.hold_seconds = 0.9 * line.hold_seconds + 0.1 * (self._clock() - started)
            self.wake(key, capacity)

    @staticmethod
    def _capacity(key: Key, capacity: Callable[[], int]) -> int:
        cap = capacity()
        if cap <= 0:
            raise Unavailable(
                f"no replica of {key[0]} version {key[1]} is in rotation", retry_after_seconds=NO_REPLICA_RETRY_SECONDS
            )
        return cap

    async def _wait(self, key: Key, line: _Line, capacity: Callable[[], int]) -> None:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        line.waiters.append(turn)
        QUEUE_DEPTH.labels(*key).set(len(line.waiters))
        try:
            async with asyncio.timeout(self._timeout):
                await turn
            line.granted -= 1
        except BaseException as exc:
            if turn.done() and not turn.cancelled():
                # Granted a slot but gone (client cancelled) before taking it: hand it to the next in line.
                line.granted -= 1
                self.wake(key, capacity)
            if isinstance(exc, TimeoutError):
                raise ResourceExhausted(
                    f"{key[0]} version {key[1]} stayed at capacity for {self._timeout:g} s",
                    retry_after_seconds=self._retry_after(line, capacity()),
                ) from None
            raise
        finally:
            if turn in line.waiters:
                line.waiters.remove(turn)
            QUEUE_DEPTH.labels(*key).set(len(line.waiters))

    def wake(self, key: Key, capacity: Callable[[], int]) -> None:
        """Lets queued requests in while key has free slots (after a release, or when capacity grows)."""
        line = self._lines.get(key)
        if line is None:
            return
        free = capacity() - line.in_flight - line.granted
        while free > 0 and line.waiters:
            turn = line.waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                line.granted += 1
                free -= 1
        QUEUE_DEPTH.labels(*key).set(len(line.waiters))
