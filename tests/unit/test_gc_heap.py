"""The runtime's garbage-collector handling: the freeze, and the pause timer's arithmetic."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from services.runtime import gc_heap


def _observed(service: str, generation: int, what: str) -> float:
    labels = {"service": service, "generation": str(generation)}
    return REGISTRY.get_sample_value(f"meshserve_gc_pause_seconds_{what}", labels) or 0.0


@pytest.fixture
def thawed() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_freeze_leaves_the_heap_out_of_later_collections(thawed: None) -> None:
    assert gc.get_freeze_count() == 0
    frozen = gc_heap.freeze()
    assert frozen == gc.get_freeze_count() > 10_000
    # What is frozen sits in no generation: a full collection walks only what came after.
    assert sum(gc.get_count()) < frozen


def test_a_pause_is_observed_under_its_generation() -> None:
    times = iter([10.0, 10.004, 20.0, 20.25])
    timer = gc_heap.PauseTimer("unit", clock=lambda: next(times))
    timer("start", {"generation": 0})
    timer("stop", {"generation": 0, "collected": 3, "uncollectable": 0})
    timer("start", {"generation": 2})
    timer("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
    assert _observed("unit", 0, "sum") == pytest.approx(0.004)
    assert _observed("unit", 2, "sum") == pytest.approx(0.25)
    assert _observed("unit", 1, "count") == 0


def test_a_real_collection_is_timed() -> None:
    timer = gc_heap.time_pauses("unit-real")
    try:
        gc.collect()
        assert _observed("unit-real", 2, "count") == 1
        assert _observed("unit-real", 2, "sum") > 0
    finally:
        gc.callbacks.remove(timer)
