"""The router's usage sink (services/router/usage.py) against a fake billing service: records that come close
together go in one batch after the linger, on one unary call that billing's client-streaming method takes as a
stream of one message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from meshserve.billing.v1 import billing_pb2, billing_pb2_grpc
from services.router.usage import GrpcUsageSink

LINGER = 0.4


class Billing(billing_pb2_grpc.BillingServiceServicer):
    def __init__(self) -> None:
        self.batches: list[tuple[float, list[str]]] = []
        self.calls = 0
        self.arrived = asyncio.Event()

    async def RecordUsage(
        self, request_iterator: AsyncIterator[billing_pb2.RecordUsageRequest], context: Any
    ) -> billing_pb2.RecordUsageResponse:
        self.calls += 1
        async for batch in request_iterator:
            self.batches.append((time.monotonic(), [r.request_id for r in batch.records]))
            self.arrived.set()
        return billing_pb2.RecordUsageResponse()


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[tuple[GrpcUsageSink, Billing]]:
    billing = Billing()
    server = aio.server()
    billing_pb2_grpc.add_BillingServiceServicer_to_server(billing, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    usage = GrpcUsageSink(f"127.0.0.1:{port}", tmp_path / "spool", linger_seconds=LINGER)
    usage.start()
    yield usage, billing
    await usage.close()
    await server.stop(None)


async def delivered(billing: Billing, records: int) -> None:
    while sum(len(ids) for _, ids in billing.batches) < records:
        billing.arrived.clear()
        await billing.arrived.wait()


async def test_records_close_together_go_in_one_batch_after_the_linger(
    sink: tuple[GrpcUsageSink, Billing],
) -> None:
    usage, billing = sink
    started = time.monotonic()
    for i in range(3):
        usage.record(billing_pb2.UsageRecord(request_id=f"r{i}"))
    await asyncio.wait_for(delivered(billing, 3), 10)
    assert [ids for _, ids in billing.batches] == [["r0", "r1", "r2"]]
    assert billing.batches[0][0] - started >= LINGER * 0.9
    usage.record(billing_pb2.UsageRecord(request_id="r3"))
    await asyncio.wait_for(delivered(billing, 4), 10)
    assert billing.calls == 2 and [ids for _, ids in billing.batches] == [["r0", "r1", "r2"], ["r3"]]
