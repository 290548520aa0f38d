"""The durable ledger: one row per tenant, key, model, hour and bucket generation, written as absolute totals.

Flushing writes a bucket's totals as they are in Redis, not increments, so writing the same bucket twice
(a flush that crashed before marking the bucket clean) leaves the same row: exactly once by construction.
A bucket that Redis lost and recreated has a new generation, so its totals add to the old row's instead
of overwriting them. Totals only grow: a stale snapshot (another billing replica flushed a newer one
first) changes nothing.

Every change to a row also writes, in the same transaction, a meter event for the payment provider: the
difference from the row's previous totals, named by the row and its new request count. The event outbox
is drained by services.billing.webhook; a change written twice yields one event.

Two backends share the SQL: embedded SQLite (WAL, synchronous FULL), the default, and PostgreSQL when a
DSN is configured. Calls are blocking; run them in a thread. Imports no gRPC.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from services.billing.meter import Bucket
from services.billing.prices import Prices

# {seq}: the outbox's ordering key, {real}: a float column; the rest is the same in both dialects.
SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS usage_hours (
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    hour BIGINT NOT NULL,
    generation TEXT NOT NULL,
    requests BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    completed BIGINT NOT NULL,
    cancelled BIGINT NOT NULL,
    failed BIGINT NOT NULL,
    cost TEXT NOT NULL,
    updated_at {real} NOT NULL,
    written_off_tokens BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, key_id, model, hour, generation)
)""",
    """
CREATE TABLE IF NOT EXISTS meter_events (
    seq {seq},
    identifier TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    hour BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cost TEXT NOT NULL,
    currency TEXT NOT NULL,
    created_at {real} NOT NULL,
    sent_at {real}
)""",
    "CREATE INDEX IF NOT EXISTS meter_events_pending ON meter_events (seq) WHERE sent_at IS NULL",
)

# The cached_* counts are of answers from the router's response cache (requests counts them too).
CACHED = ("cached", "cached_prompt_tokens", "cached_completion_tokens")
COUNTS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "completed",
    "cancelled",
    "failed",
    "written_off_tokens",
    *CACHED,
)
ROW_KEY = "tenant = ? AND key_id = ? AND model = ? AND hour = ? AND generation = ?"
ROW_COLUMNS = ("tenant", "key_id", "model", "hour", "generation", *COUNTS, "cost", "updated_at")
# Columns added after the first release, with what an older ledger's rows hold in them.
ADDED_COLUMNS = {column: "BIGINT NOT NULL DEFAULT 0" for column in ("written_off_tokens", *CACHED)}

UPSERT = f"""
INSERT INTO usage_hours ({", ".join(ROW_COLUMNS)}) VALUES ({", ".join("?" for _ in ROW_COLUMNS)})
ON CONFLICT (tenant, key_id, model, hour, generation) DO UPDATE SET
    {", ".join(f"{c} = excluded.{c}" for c in (*COUNTS, "cost", "updated_at"))}
"""

EVENT_COLUMNS = (
    "identifier, tenant, key_id, model, hour, requests, prompt_tokens, completion_tokens, cost, currency, created_at"
)
INSERT_EVENT = f"INSERT INTO meter_events ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


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
    # Generated tokens no client received: recorded, not billed.
    written_off_tokens: int = 0
    # Requests answered from the response cache (in requests too), and their answers' tokens.
    cached: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0


@dataclass(frozen=True)
class MeterEvent:
    """Usage added to one tenant, key, model and hour since the previous event: what the provider bills."""

    seq: int
    # Stable across retries: the provider drops an identifier it has seen.
    identifier: str
    tenant: str
    key_id: str
    model: str
    hour: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal
    currency: str
    created_at: float


class Ledger(Protocol):
    """What billing needs of a ledger; SqliteLedger and PostgresLedger."""

    def write(self, buckets: Sequence[Bucket], prices: Prices) -> int: ...

    def usage(
        self, start_hour: int, end: int, tenant: str = "", key_id: str = "", model: str = ""
    ) -> list[UsageLine]: ...

    def pending_events(self, limit: int) -> list[MeterEvent]: ...

    def mark_sent(self, seqs: Sequence[int]) -> None: ...

    def close(self) -> None: ...


def event_identifier(b: Bucket) -> str:
    """Names a row's state: a bucket written twice at the same totals gives the same identifier."""
    text = f"{b.tenant}\0{b.key_id}\0{b.model}\0{b.hour}\0{b.generation}\0{b.requests}"
    return "mev_" + hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


class SqlLedger:
    """The ledger's logic over a DB-API connection; subclasses open it and say how a transaction starts."""

    # DB-API parameter marker of the driver.
    marker = "?"
    # SQL the previous totals are read with inside a write (PostgreSQL locks the row).
    select_suffix = ""
    # Column types that differ between the dialects.
    seq_type = ""
    real_type = ""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._db = self._connect()
        with self._transaction() as cur:
            for statement in SCHEMA:
                cur.execute(statement.format(seq=self.seq_type, real=self.real_type))
            present = self._columns(cur)
            for column, kind in ADDED_COLUMNS.items():
                if column not in present:
                    cur.execute(f"ALTER TABLE usage_hours ADD COLUMN {column} {kind}")

    def _columns(self, cur: Any) -> set[str]:
        """The columns usage_hours has (an older ledger lacks the ones added since)."""
        raise NotImplementedError

    def _connect(self) -> Any:
        raise NotImplementedError

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        raise NotImplementedError

    def _sql(self, text: str) -> str:
        return text if self.marker == "?" else text.replace("?", self.marker)

    def write(self, buckets: Sequence[Bucket], prices: Prices) -> int:
        """Writes each bucket's totals (and their cost at today's prices) in one transaction, with a meter
        event for every row that grew; returns how many events were written."""
        now = time.time()
        events = 0
        with self._transaction() as cur:
            for b in buckets:
                key = (b.tenant, b.key_id, b.model, b.hour, b.generation)
                cur.execute(
                    self._sql(
                        f"SELECT requests, prompt_tokens, completion_tokens, cost FROM usage_hours WHERE {ROW_KEY}"
                    )
                    + self.select_suffix,
                    key,
                )
                old = cur.fetchone()
                old_requests, old_prompt, old_completion, old_cost = old if old else (0, 0, 0, "0")
                if b.requests <= old_requests:
                    continue  # the same totals again, or an older snapshot than the row's
                cached = (b.cached, b.cached_prompt_tokens, b.cached_completion_tokens)
                cost = prices.cost(
                    b.model,
                    b.prompt_tokens,
                    b.completion_tokens,
                    cached_prompt_tokens=b.cached_prompt_tokens,
                    cached_completion_tokens=b.cached_completion_tokens,
                )
                counts = (
                    b.requests,
                    b.prompt_tokens,
                    b.completion_tokens,
                    b.completed,
                    b.cancelled,
                    b.failed,
                    b.written_off_tokens,
                    *cached,
                )
                cur.execute(self._sql(UPSERT), (*key, *counts, str(cost), now))
                cur.execute(
                    self._sql(INSERT_EVENT),
                    (
                        event_identifier(b),
                        b.tenant,
                        b.key_id,
                        b.model,
                        b.hour,
                        b.requests - old_requests,
                        b.prompt_tokens - old_prompt,
                        b.completion_tokens - old_completion,
                        str(cost - Decimal(old_cost)),
                        prices.currency,
                        now,
                    ),
                )
                events += 1
        return events

    def usage(self, start_hour: int, end: int, tenant: str = "", key_id: str = "", model: str = "") -> list[UsageLine]:
        """Sums per tenant, key and model over the hours in [start_hour, end); costs summed as decimals."""
        where = ["hour >= ?", "hour < ?"]
        args: list[object] = [start_hour, end]
        for column, value in (("tenant", tenant), ("key_id", key_id), ("model", model)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "SELECT tenant, key_id, model, requests, prompt_tokens, completion_tokens, cost, "
                    f"written_off_tokens, {', '.join(CACHED)} FROM usage_hours "
                    f"WHERE {' AND '.join(where)} ORDER BY tenant, key_id, model, hour"
                ),
                args,
            )
            rows = cur.fetchall()
        lines: dict[tuple[str, str, str], UsageLine] = {}
        for t, k, m, requests, prompt, completion, cost, written_off, cached, cached_prompt, cached_completion in rows:
            old = lines.get((t, k, m)) or UsageLine(t, k, m, 0, 0, 0, Decimal(0))
            lines[(t, k, m)] = UsageLine(
                t,
                k,
                m,
                old.requests + requests,
                old.prompt_tokens + prompt,
                old.completion_tokens + completion,
                old.cost + Decimal(cost),
                old.written_off_tokens + written_off,
                old.cached + cached,
                old.cached_prompt_tokens + cached_prompt,
                old.cached_completion_tokens + cached_completion,
            )
        return list(lines.values())

    def pending_events(self, limit: int) -> list[MeterEvent]:
        """The oldest events not yet acknowledged by the provider, in the order they were written."""
        with self._transaction() as cur:
            cur.execute(
                self._sql(f"SELECT seq, {EVENT_COLUMNS} FROM meter_events WHERE sent_at IS NULL ORDER BY seq LIMIT ?"),
                (limit,),
            )
            rows = cur.fetchall()
        return [
            MeterEvent(seq, ident, t, k, m, hour, requests, prompt, completion, Decimal(cost), currency, created_at)
            for seq, ident, t, k, m, hour, requests, prompt, completion, cost, currency, created_at in rows
        ]

    def mark_sent(self, seqs: Sequence[int]) -> None:
        now = time.time()
        with self._transaction() as cur:
            cur.executemany(self._sql("UPDATE meter_events SET sent_at = ? WHERE seq = ?"), [(now, s) for s in seqs])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class SqliteLedger(SqlLedger):
    """The ledger in one SQLite file: for a single billing replica with a persistent volume."""

    seq_type = "INTEGER PRIMARY KEY AUTOINCREMENT"
    real_type = "REAL"

    def __init__(self, path: Path) -> None:
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__()

    def _columns(self, cur: Any) -> set[str]:
        cur.execute("PRAGMA table_info(usage_hours)")
        return {row[1] for row in cur.fetchall()}

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")


class PostgresLedger(SqlLedger):
    """The ledger in PostgreSQL: for several billing replicas, or a database the platform already runs."""

    marker = "%s"
    select_suffix = " FOR UPDATE"
    seq_type = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    real_type = "DOUBLE PRECISION"

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        super().__init__()

    def _columns(self, cur: Any) -> set[str]:
        cur.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'usage_hours' AND table_schema = current_schema()"
        )
        return {row[0] for row in cur.fetchall()}

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self._dsn, connect_timeout=5, autocommit=True)

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._lock:
            if self._db.closed or self._db.broken:
                # The server restarted or the connection dropped: the next call reconnects.
                self._db = self._connect()
            with self._db.transaction(), self._db.cursor() as cur:
                yield cur


def open_ledger(path: str, dsn: str) -> Ledger:
    """PostgreSQL when a DSN is given, otherwise SQLite at path."""
    return PostgresLedger(dsn) if dsn else SqliteLedger(Path(path))
