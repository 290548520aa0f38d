"""A replica's load stream says each change once: an idle replica sends nothing after its first report."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import SimpleNamespace

from meshserve.inference.v1 import inference_pb2
from services.inference.engine import Load
from services.inference.servicer import InferenceServicer


async def test_an_unchanged_load_is_reported_once_and_a_change_at_the_next_interval() -> None:
    draining = asyncio.Event()
    servicer = InferenceServicer(draining=draining, pool="spot")
    engine = SimpleNamespace(current=Load(running=0, max_num_seqs=4))
    engine.load = lambda: engine.current
    servicer.engine = engine  # type: ignore[assignment]
    reports: list[inference_pb2.WatchLoadResponse] = []

    async def watch() -> None:
        async for report in servicer.WatchLoad(inference_pb2.WatchLoadRequest(interval_ms=5), None):  # type: ignore[arg-type]
            reports.append(report)

    watching = asyncio.create_task(watch())
    await asyncio.sleep(0.1)  # about 20 intervals
    assert [(r.load.running, r.load.pool) for r in reports] == [(0, "spot")]
    engine.current = replace(engine.current, running=2)
    await asyncio.sleep(0.05)
    assert [r.load.running for r in reports] == [0, 2]
    draining.set()
    await asyncio.wait_for(watching, 1)
