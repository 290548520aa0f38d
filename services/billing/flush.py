"""Moves changed buckets from Redis into the ledger, exactly once. Imports no gRPC.

Order: read the bucket (with its version), write its totals to the ledger, then mark it clean only if
its version is unchanged. A crash after the write and before the mark writes the same totals again
next time; a record counted meanwhile leaves the bucket dirty for the next flush.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from prometheus_client import Counter, Gauge

from services.billing.ledger import Ledger
from services.billing.meter import Meter
from services.billing.prices import Prices

log = logging.getLogger(__name__)

FLUSHED = Counter("meshserve_billing_flushed_buckets_total", "Hourly buckets written to the ledger.")
LAST_FLUSH = Gauge("meshserve_billing_last_flush_timestamp_seconds", "When the ledger last caught up with Redis.")
BACKLOG = Gauge("meshserve_billing_backlog_buckets", "Buckets changed in Redis and not yet in the ledger.")


async def flush_once(meter: Meter, ledger: Ledger, prices: Prices) -> int:
    """One pass over the changed buckets; returns how many reached the ledger."""
    keys = await meter.dirty()
    buckets = []
    for key in keys:
        bucket = await meter.read(key)
        if bucket is None:
            await meter.forget(key)  # expired after its last flush
        else:
            buckets.append(bucket)
    if buckets:
        await asyncio.to_thread(ledger.write, buckets, prices)
    clean = 0
    for bucket in buckets:
        clean += await meter.caught_up(bucket)
    FLUSHED.inc(len(buckets))
    BACKLOG.set(len(keys) - clean)
    if clean == len(keys):
        LAST_FLUSH.set(time.time())
    return len(buckets)


async def flush_forever(meter: Meter, ledger: Ledger, prices: Callable[[], Prices], seconds: float) -> None:
    """Flushes every few seconds; a failed pass (Redis or disk) is logged and tried again."""
    while True:
        try:
            await flush_once(meter, ledger, prices())
        except Exception:
            log.exception("ledger flush failed; retrying")
        await asyncio.sleep(seconds)
