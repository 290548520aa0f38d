"""The durable ledger: one row per tenant, key, model, hour and bucket generation, written as absolute totals.

Flushing writes a bucket's totals as they are in Redis, not increments, so writing the same bucket twice
(a flush that crashed before marking the bucket clean) leaves the same row: exactly once by construction.
A bucket that Redis lost and recreated has a new generation, so its totals add to the old row's instead
of overwriting them.
Embedded SQLite (WAL, synchronous FULL). Imports no gRPC.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from services.billing.meter import Bucket
from services.billing.prices import Prices

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_hours (
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    hour INTEGER NOT NULL,
    generation TEXT NOT NULL,
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    completed INTEGER NOT NULL,
    cancelled INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    cost TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (tenant, key_id, model, hour, generation)
)
"""

UPSERT = """
INSERT INTO usage_hours VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (tenant, key_id, model, hour, generation) DO UPDATE SET
    requests = excluded.requests,
    prompt_tokens = excluded.prompt_tokens,
    completion_tokens = excluded.completion_tokens,
    completed = excluded.completed,
    cancelled = excluded.cancelled,
    failed = excluded.failed,
    cost = excluded.cost,
    updated_at = excluded.updated_at
"""


@dataclass(frozen=True)
class UsageLine:
    """Usage and cost of one tenant, key and model over a range of hours."""

    tenant: str
    key_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal


class SqliteLedger:
    """The ledger in one SQLite file; calls are blocking (run them in a thread)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(SCHEMA)

    def write(self, buckets: Sequence[Bucket], prices: Prices) -> None:
        """Writes each bucket's totals (and their cost at today's prices) in one transaction."""
        now = time.time()
        rows = [
            (
                b.tenant,
                b.key_id,
                b.model,
                b.hour,
                b.generation,
                b.requests,
                b.prompt_tokens,
                b.completion_tokens,
                b.completed,
                b.cancelled,
                b.failed,
                str(prices.cost(b.model, b.prompt_tokens, b.completion_tokens)),
                now,
            )
            for b in buckets
        ]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(UPSERT, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def usage(self, start_hour: int, end: int, tenant: str = "", key_id: str = "", model: str = "") -> list[UsageLine]:
        """Sums per tenant, key and model over the hours in [start_hour, end); costs summed as decimals."""
        where = ["hour >= ?", "hour < ?"]
        args: list[object] = [start_hour, end]
        for column, value in (("tenant", tenant), ("key_id", key_id), ("model", model)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        with self._lock:
            rows = self._db.execute(
                "SELECT tenant, key_id, model, requests, prompt_tokens, completion_tokens, cost FROM usage_hours "
                f"WHERE {' AND '.join(where)} ORDER BY tenant, key_id, model, hour",
                args,
            ).fetchall()
        lines: dict[tuple[str, str, str], UsageLine] = {}
        for t, k, m, requests, prompt, completion, cost in rows:
            old = lines.get((t, k, m))
            if old is None:
                lines[(t, k, m)] = UsageLine(t, k, m, requests, prompt, completion, Decimal(cost))
            else:
                lines[(t, k, m)] = UsageLine(
                    t,
                    k,
                    m,
                    old.requests + requests,
                    old.prompt_tokens + prompt,
                    old.completion_tokens + completion,
                    old.cost + Decimal(cost),
                )
        return list(lines.values())

    def close(self) -> None:
        with self._lock:
            self._db.close()
