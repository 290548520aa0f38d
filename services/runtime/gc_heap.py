"""The garbage collector of a long-running service: the start-up heap frozen once warm, and every pause timed.

A full (generation 2) collection walks every tracked object. A service's start-up heap (protobuf descriptors,
gRPC, OpenTelemetry; in a replica vLLM, PyTorch and the tokenizer too) never becomes garbage, yet each full
collection walked all of it while every call of the process waited: 40-90 ms in the control-plane services and
300-370 ms in an inference replica on these CPUs (bench/reports/gc_pauses.md). Frozen once the service is warm
(`gc.freeze`, what vLLM's own server does after start-up), those objects are left out of every later collection.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

from prometheus_client import Histogram

GC_PAUSE = Histogram(
    "meshserve_gc_pause_seconds",
    "Time each garbage collection held the process, by generation (2: a full collection).",
    ["service", "generation"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)


def freeze() -> int:
    """Collects what start-up left as garbage, then freezes everything still tracked; the objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class PauseTimer:
    """A gc callback that observes each collection's pause in GC_PAUSE."""

    def __init__(self, service: str, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._started = 0.0
        self._pauses = [GC_PAUSE.labels(service, str(generation)) for generation in range(3)]

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = self._clock()
        else:
            self._pauses[info["generation"]].observe(self._clock() - self._started)


def time_pauses(service: str) -> PauseTimer:
    """Times this process's collections from now on, as service; the callback installed."""
    timer = PauseTimer(service)
    gc.callbacks.append(timer)
    return timer
