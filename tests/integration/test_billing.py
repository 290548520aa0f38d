"""Billing on real Redis, SQLite and PostgreSQL: once per request id, exact ledger flushes, the payment
provider's webhook (the service and the router's spool: test_billing_service.py)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import redis.asyncio as redis

from services.billing.flush import flush_once
from services.billing.ledger import SCHEMA, Ledger, PostgresLedger, SqliteLedger
from services.billing.meter import TOKENS, Meter, Usage
from services.billing.prices import Prices
from services.billing.webhook import WebhookSink
from services.runtime.errors import InvalidArgument
from tests.postgres import fresh_database
from tests.webhook_receiver import Receiver

MODEL = "smollm2-135m-instruct"
PRICES = Prices.model_validate(
    {"models": {MODEL: {"prompt_per_1k": Decimal("0.0002"), "completion_per_1k": Decimal("0.0006")}}}
)


@pytest.fixture(params=["sqlite", "postgres"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    """Each ledger test runs on both backends."""
    if request.param == "sqlite":
        db: Ledger = SqliteLedger(tmp_path / "ledger.sqlite")
    else:
        db = PostgresLedger(fresh_database(request.getfixturevalue("postgres")))
    yield db
    db.close()


def usage(request_id: str, prompt: int = 10, completion: int = 5, key: str = "key_1", **kw: object) -> Usage:
    fields: dict[str, object] = {
        "tenant": "acme",
        "key_id": key,
        "model": MODEL,
        "version": "v1",
        "outcome": "completed",
        "finished_at": time.time(),
        **kw,
    }
    return Usage(request_id, prompt_tokens=prompt, completion_tokens=completion, **fields)  # type: ignore[arg-type]


async def test_the_same_record_counts_once_and_the_ledger_gets_exact_totals(
    client: redis.Redis, ledger: Ledger
) -> None:
    meter = Meter(client)
    assert await meter.record([usage("r1"), usage("r2", 20, 7), usage("r1")]) == (2, 1)
    assert await meter.record([usage("r2", 20, 7)]) == (0, 1)
    assert await flush_once(meter, ledger, PRICES) == 1
    [line] = ledger.usage(0, int(time.time()) + 3600)
    assert (line.requests, line.prompt_tokens, line.completion_tokens) == (2, 30, 12)
    assert line.cost == Decimal("0.000013")  # 30 x 0.0002/1000 + 12 x 0.0006/1000, exactly
    assert await meter.dirty() == []


async def test_a_flush_that_crashed_before_marking_writes_the_same_totals_again(
    client: redis.Redis, ledger: Ledger
) -> None:
    meter = Meter(client)
    await meter.record([usage(f"r{i}") for i in range(5)])
    # A flusher that wrote the ledger and died before marking the bucket clean...
    [key] = await meter.dirty()
    bucket = await meter.read(key)
    assert bucket is not None
    ledger.write([bucket], PRICES)
    # ...and a record that arrived meanwhile.
    await meter.record([usage("late")])
    assert not await meter.caught_up(bucket)
    await flush_once(meter, ledger, PRICES)
    await flush_once(meter, ledger, PRICES)
    [line] = ledger.usage(0, int(time.time()) + 3600)
    assert (line.requests, line.prompt_tokens, line.completion_tokens) == (6, 60, 30)


async def test_written_off_tokens_are_kept_apart_from_billed_ones(client: redis.Redis, ledger: Ledger) -> None:
    meter = Meter(client)
    await meter.record([usage("ok"), usage("failed", completion=0, outcome="failed", written_off_tokens=9)])
    await flush_once(meter, ledger, PRICES)
    [line] = ledger.usage(0, int(time.time()) + 3600)
    assert (line.requests, line.completion_tokens, line.written_off_tokens) == (2, 5, 9)
    assert line.cost == PRICES.cost(MODEL, 20, 5)


async def test_cached_answers_are_counted_apart_at_the_cache_price(client: redis.Redis, ledger: Ledger) -> None:
    meter = Meter(client)
    generated = TOKENS.labels(MODEL, "completion")._value.get()
    await meter.record([usage("made"), usage("hit-1", outcome="cached"), usage("hit-2", 4, 3, outcome="cached")])
    # Drift compares generated tokens with billed ones: no engine made the cached answers' tokens.
    assert TOKENS.labels(MODEL, "completion")._value.get() == generated + 5
    await flush_once(meter, ledger, PRICES)
    [line] = ledger.usage(0, int(time.time()) + 3600)
    assert (line.requests, line.prompt_tokens, line.completion_tokens) == (3, 10, 5)
    assert (line.cached, line.cached_prompt_tokens, line.cached_completion_tokens) == (2, 14, 8)
    assert line.cost == PRICES.cost(MODEL, 10, 5)  # cached tokens cost nothing by default
    priced = Prices.model_validate(
        {"models": {MODEL: {**PRICES.models[MODEL].model_dump(), "cached_completion_per_1k": Decimal("0.0001")}}}
    )
    assert priced.cost(MODEL, 10, 5, cached_prompt_tokens=14, cached_completion_tokens=8) == Decimal("0.000006")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_ledger_from_before_written_off_tokens_is_migrated_in_place(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    old_schema = SCHEMA[0].replace("    written_off_tokens BIGINT NOT NULL DEFAULT 0,\n", "")
    assert "written_off" not in old_schema
    row = "INSERT INTO usage_hours VALUES ('acme', 'k', 'm', 0, 'g', 1, 10, 5, 1, 0, 0, '0.1', 0)"
    if backend == "sqlite":
        path = tmp_path / "old.sqlite"
        with sqlite3.connect(path) as db:
            db.execute(old_schema.format(real="REAL"))
            db.execute(row)
        ledger: Ledger = SqliteLedger(path)
    else:
        import psycopg

        dsn = fresh_database(request.getfixturevalue("postgres"))
        with psycopg.connect(dsn, autocommit=True) as db:
            db.execute(old_schema.format(real="DOUBLE PRECISION"))  # type: ignore[arg-type]
            db.execute(row)  # type: ignore[arg-type]
        ledger = PostgresLedger(dsn)
    try:
        [line] = ledger.usage(0, 3600)
        assert (line.requests, line.completion_tokens, line.written_off_tokens, line.cached) == (1, 5, 0, 0)
    finally:
        ledger.close()


async def test_records_are_bucketed_per_key_and_hour_and_queries_filter(client: redis.Redis, ledger: Ledger) -> None:
    meter = Meter(client)
    now = time.time()
    await meter.record(
        [usage("a", key="key_a"), usage("b", key="key_b"), usage("old", key="key_a", finished_at=now - 7200)]
    )
    await flush_once(meter, ledger, PRICES)
    lines = {line.key_id: line for line in ledger.usage(0, int(now) + 3600)}
    assert lines["key_a"].requests == 2 and lines["key_b"].requests == 1
    recent = ledger.usage(int(now) // 3600 * 3600, int(now) + 3600, key_id="key_a")
    assert [line.requests for line in recent] == [1]


async def test_bad_records_are_refused_whole(client: redis.Redis) -> None:
    meter = Meter(client)
    with pytest.raises(InvalidArgument, match="outcome"):
        await meter.record([usage("ok"), usage("bad", outcome="exploded")])
    with pytest.raises(InvalidArgument, match="within the last 7 days"):
        await meter.record([usage("ancient", finished_at=time.time() - 8 * 86400)])
    assert await meter.dirty() == []


async def test_a_bucket_redis_lost_and_recreated_adds_to_the_ledger_instead_of_overwriting(
    client: redis.Redis, ledger: Ledger
) -> None:
    meter = Meter(client)
    await meter.record([usage(f"before-{i}") for i in range(3)])
    await flush_once(meter, ledger, PRICES)
    await client.flushdb()  # Redis lost everything
    meter = Meter(client)
    await meter.record([usage("after-1")])
    await flush_once(meter, ledger, PRICES)
    [line] = ledger.usage(0, int(time.time()) + 3600)
    assert (line.requests, line.prompt_tokens) == (4, 40)


async def test_every_change_to_a_row_writes_one_meter_event_of_the_difference(
    client: redis.Redis, ledger: Ledger
) -> None:
    meter = Meter(client)
    await meter.record([usage("e1", 10, 5), usage("e2", 20, 7)])
    await flush_once(meter, ledger, PRICES)
    assert await meter.dirty() == []
    await meter.record([usage("e3", 4, 1)])
    [dirty] = await meter.dirty()
    bucket = await meter.read(dirty)
    assert bucket is not None
    assert ledger.write([bucket], PRICES) == 1
    assert ledger.write([bucket], PRICES) == 0  # the same totals again: no event
    first, second = ledger.pending_events(10)
    assert (first.requests, first.prompt_tokens, first.completion_tokens) == (2, 30, 12)
    assert (second.requests, second.prompt_tokens, second.completion_tokens) == (1, 4, 1)
    assert first.cost + second.cost == PRICES.cost(MODEL, 34, 13)
    assert first.identifier != second.identifier and first.currency == "USD"
    ledger.mark_sent([first.seq])
    assert [e.seq for e in ledger.pending_events(10)] == [second.seq]


async def test_an_older_snapshot_never_overwrites_newer_totals(client: redis.Redis, ledger: Ledger) -> None:
    meter = Meter(client)
    await meter.record([usage("s1")])
    [key] = await meter.dirty()
    older = await meter.read(key)
    await meter.record([usage("s2")])
    newer = await meter.read(key)
    assert older is not None and newer is not None
    ledger.write([newer], PRICES)
    assert ledger.write([older], PRICES) == 0  # another replica's stale flush arriving late
    [line] = ledger.usage(0, int(time.time()) + 3600)
    assert line.requests == 2
    assert sum(e.requests for e in ledger.pending_events(10)) == 2


async def test_the_webhook_gets_every_meter_event_once_while_it_fails_for_a_while(
    client: redis.Redis, ledger: Ledger
) -> None:
    receiver = Receiver(secret="whsec_test", fail_first=4)
    sink = WebhookSink(ledger, receiver.url, "whsec_test", batch_size=3, backoff_seconds=(0.02, 0.1))
    meter = Meter(client)
    try:
        sender = asyncio.create_task(sink.run_forever(0.02))
        for round_ in range(4):
            await meter.record([usage(f"w{round_}-{i}", 10 + i, i, key=f"key_{i % 3}") for i in range(5)])
            await flush_once(meter, ledger, PRICES)
        deadline = time.monotonic() + 20
        while ledger.pending_events(1):
            assert time.monotonic() < deadline, "the webhook never caught up"
            await asyncio.sleep(0.05)
        sender.cancel()
    finally:
        await sink.close()
        receiver.close()
    assert receiver.failed == 4 and receiver.bad_signatures == 0
    assert set(receiver.seen.values()) == {1}  # every identifier exactly once
    for line in ledger.usage(0, int(time.time()) + 3600):
        assert receiver.totals(line.key_id) == (line.requests, line.prompt_tokens, line.completion_tokens)


async def test_a_batch_resent_after_a_lost_acknowledgement_keeps_its_identifiers(
    client: redis.Redis, ledger: Ledger
) -> None:
    receiver = Receiver()
    sink = WebhookSink(ledger, receiver.url)
    meter = Meter(client)
    await meter.record([usage("lost-1"), usage("lost-2", key="key_b")])
    await flush_once(meter, ledger, PRICES)
    mark_sent = ledger.mark_sent
    try:
        # The webhook took the batch, and billing died before it wrote that down.
        def disk_gone(seqs: object) -> None:
            raise OSError("disk gone")

        ledger.mark_sent = disk_gone  # type: ignore[method-assign,assignment]
        with pytest.raises(OSError):
            await sink.send_once()
        ledger.mark_sent = mark_sent  # type: ignore[method-assign]
        assert await sink.send_once() == 2
    finally:
        await sink.close()
        receiver.close()
    # The provider sees each identifier twice and, deduplicating on it, bills each event once.
    assert sorted(receiver.seen.values()) == [2, 2] and len(receiver.events) == 2
