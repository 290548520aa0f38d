"""Usage records from the router to billing: batched off the request's path, spooled to disk while billing is away.

record() only queues. A sender batches what is queued (up to 256 records or 100 ms) and sends each batch
on one RecordUsage call (a client stream of one message). A batch billing did not acknowledge is written to
the spool folder (fsynced, renamed into place), and a replayer sends the spooled batches once billing answers
again.
Billing counts each request id once, so a batch sent twice (acknowledged, but the answer was lost) costs
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from pathlib import Path

from grpc import aio
from prometheus_client import Counter, Gauge

from meshserve.billing.v1 import billing_pb2
from services.runtime import keepalive, tls

log = logging.getLogger(__name__)

RECORD_USAGE = f"/{billing_pb2.DESCRIPTOR.services_by_name['BillingService'].full_name}/RecordUsage"

SENT = Counter("meshserve_router_usage_records_sent_total", "Usage records billing acknowledged.")
SPOOLED = Counter("meshserve_router_usage_records_spooled_total", "Usage records written to the spool.")
SPOOL_FILES = Gauge("meshserve_router_usage_spool_batches", "Batches waiting in the spool for billing.")


class _OneBatch:
    """Billing's RecordUsage called with one batch as a unary call: on the wire the same as a client stream of
    one message, which is what billing's method reads. grpc.aio hands every finished operation from its poller
    thread to the event loop, waking both; a stream call has about four (the metadata, the message, the
    half-close, the reply and status), a unary one one. Measured on the whole path over a scripted replica, one
    unary chat per 70 ms, 2 x 3 rounds alternated: the router's threads were put on a CPU 67.4 times per request
    with the stream, 61.2 with this; billing's 18.8 and 15.0."""

    def __init__(self, channel: aio.Channel) -> None:
        self.record_usage = channel.unary_unary(
            RECORD_USAGE,
            request_serializer=billing_pb2.RecordUsageRequest.SerializeToString,
            response_deserializer=billing_pb2.RecordUsageResponse.FromString,
        )


class GrpcUsageSink:
    """The router's side of billing."""

    def __init__(
        self,
        address: str,
        spool: Path,
        batch_size: int = 256,
        linger_seconds: float = 0.1,
        replay_seconds: float = 2.0,
        timeout_seconds: float = 5.0,
        files: tls.Files | None = None,
    ) -> None:
        self._channel = tls.MeshChannel(address, files, "billing", _OneBatch, keepalive.channel_options())
        self._spool = spool
        self._batch_size = batch_size
        self._linger = linger_seconds
        self._replay_seconds = replay_seconds
        self._timeout = timeout_seconds
        self._queue: asyncio.Queue[billing_pb2.UsageRecord] = asyncio.Queue()
        self._batch = billing_pb2.RecordUsageRequest()
        self._tasks: list[asyncio.Task[None]] = []
        spool.mkdir(parents=True, exist_ok=True)

    def record(self, record: billing_pb2.UsageRecord) -> None:
        self._queue.put_nowait(record)

    def start(self) -> None:
        SPOOL_FILES.set(len(self._spooled()))
        self._tasks = [asyncio.create_task(self._send_forever()), asyncio.create_task(self._replay_forever())]

    async def _send(self, batch: billing_pb2.RecordUsageRequest) -> bool:
        try:
            await self._channel.stub.record_usage(batch, timeout=self._timeout)
        except aio.AioRpcError as exc:
            log.warning("billing unreachable; spooling usage", extra={"error": exc.code().name})
            return False
        SENT.inc(len(batch.records))
        return True

    async def _send_forever(self) -> None:
        while True:
            # The batch being built or sent lives on the instance: close() sends whatever is left of it.
            self._batch.records.append(await self._queue.get())
            # One wake-up per batch, not per record: take what is queued, linger once if the batch is not
            # full yet, take what came meanwhile. A backlog goes out in full batches back to back.
            self._take_queued()
            if len(self._batch.records) < self._batch_size:
                await asyncio.sleep(self._linger)
                self._take_queued()
            if not await self._send(self._batch):
                await asyncio.to_thread(self._write_spool, self._batch)
            self._batch = billing_pb2.RecordUsageRequest()

    def _take_queued(self) -> None:
        while len(self._batch.records) < self._batch_size and not self._queue.empty():
            self._batch.records.append(self._queue.get_nowait())

    def _write_spool(self, batch: billing_pb2.RecordUsageRequest) -> None:
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        tmp = self._spool / f".{name}.tmp"
        with tmp.open("wb") as out:
            out.write(batch.SerializeToString())
            out.flush()
            os.fsync(out.fileno())
        tmp.rename(self._spool / f"{name}.batch")
        dir_fd = os.open(self._spool, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        SPOOLED.inc(len(batch.records))
        SPOOL_FILES.set(len(self._spooled()))

    def _spooled(self) -> list[Path]:
        return sorted(self._spool.glob("*.batch"))

    async def replay(self) -> int:
        """Sends spooled batches, oldest first, until one fails; returns how many went."""
        sent = 0
        for path in self._spooled():
            batch = billing_pb2.RecordUsageRequest.FromString(path.read_bytes())
            if not await self._send(batch):
                break
            path.unlink()
            sent += 1
        SPOOL_FILES.set(len(self._spooled()))
        if sent:
            log.info("spooled usage delivered", extra={"batches": sent})
        return sent

    async def _replay_forever(self) -> None:
        while True:
            await asyncio.sleep(self._replay_seconds)
            if self._spooled():
                await self.replay()

    async def close(self) -> None:
        """Sends what is queued (or spools it), then closes the channel."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        batch, self._batch = self._batch, billing_pb2.RecordUsageRequest()
        while not self._queue.empty():
            batch.records.append(self._queue.get_nowait())
        if batch.records and not await self._send(batch):
            self._write_spool(batch)
        await self._channel.close()
