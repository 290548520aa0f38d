"""Usage aggregation in Redis: hourly buckets per tenant, key and model, counted once per request id.

One Lua script counts a batch: each request's marker (SET NX) and its bucket's counters change together
or not at all, so a record sent twice (a retried batch, a replayed spool) counts once. Every change bumps
the bucket's version and puts it in the set of buckets the ledger has not caught up with. Imports no gRPC.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from prometheus_client import Counter

from services.billing.prices import Prices
from services.runtime.errors import InvalidArgument

# cached: answered from the router's response cache (its tokens are counted apart, as cached_* tokens).
OUTCOMES = ("completed", "cancelled", "failed", "cached")
HOUR = 3600
DIRTY = "mb:dirty"
# Records per script call: big enough to amortise the round trip, small enough not to stall Redis.
CHUNK = 512

TOKEN_KINDS = ("prompt", "completion", "written_off", "cached_prompt", "cached_completion")

RECORDS = Counter("meshserve_billing_records_total", "Usage records received, by result.", ["result"])
TOKENS = Counter(
    "meshserve_billing_tokens_total",
    "Tokens counted into the aggregates, by model and kind (prompt, completion, written_off: made, not received;"
    " cached_prompt, cached_completion: of answers from the response cache).",
    ["model", "kind"],
)
SPEND = Counter(
    "meshserve_billing_cost_total",
    "Cost of the tokens counted, at the current prices, by model and currency (for dashboards; the ledger is exact).",
    ["model", "currency"],
)


@dataclass(frozen=True)
class Usage:
    """What one request used."""

    request_id: str
    tenant: str
    key_id: str
    model: str
    version: str
    prompt_tokens: int
    completion_tokens: int
    outcome: str
    # Unix seconds; decides the hour billed.
    finished_at: float
    queue_seconds: float = 0.0
    ttft_seconds: float = 0.0
    total_seconds: float = 0.0
    # Generated tokens no client received (not billed, not in completion_tokens).
    written_off_tokens: int = 0


@dataclass(frozen=True)
class Bucket:
    """One hour of one tenant, key and model, as Redis holds it."""

    key: str
    tenant: str
    key_id: str
    model: str
    hour: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    completed: int
    cancelled: int
    failed: int
    version: str
    # Set when Redis creates the bucket; a bucket Redis lost and recreated is a new generation.
    generation: str
    written_off_tokens: int = 0
    # Requests answered from the response cache (in requests too), and the tokens their answers reported.
    cached: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0


def bucket_key(tenant: str, key_id: str, model: str, hour: int) -> str:
    digest = hashlib.blake2b(f"{tenant}\0{key_id}\0{model}".encode(), digest_size=10).hexdigest()
    return f"mb:b:{hour}:{digest}"


def _script(name: str) -> str:
    return resources.files("services.billing").joinpath(name).read_text()


class Meter:
    """Counts usage records into Redis and hands the changed buckets to the ledger."""

    def __init__(
        self,
        redis: Any,
        max_age_seconds: int = 7 * 24 * HOUR,
        clock: Any = time.time,
        prices: Callable[[], Prices] | None = None,
    ) -> None:
        self._redis = redis
        self._prices = prices
        # Request markers outlive the oldest record accepted, and buckets outlive their markers: a record
        # can never find its marker gone (counting twice) or its bucket gone (restarting a total at zero).
        self._max_age = max_age_seconds
        self._marker_ttl = max_age_seconds + 24 * HOUR
        self._bucket_ttl = max_age_seconds + 48 * HOUR
        self._clock = clock
        self._record = redis.register_script(_script("record.lua"))
        self._flushed = redis.register_script(_script("flushed.lua"))

    def _check(self, u: Usage) -> None:
        if not u.request_id:
            raise InvalidArgument("records: request_id is required")
        if not u.model:
            raise InvalidArgument(f"record {u.request_id}: model is required")
        if u.outcome not in OUTCOMES:
            raise InvalidArgument(f"record {u.request_id}: outcome must be one of {', '.join(OUTCOMES)}")
        now = self._clock()
        if not now - self._max_age <= u.finished_at <= now + 300:
            raise InvalidArgument(
                f"record {u.request_id}: finished_at must be within the last {self._max_age // 86400} days"
            )

    async def record(self, records: Sequence[Usage]) -> tuple[int, int]:
        """Counts a batch; returns (accepted, duplicates). Validates the whole batch first.

        One script call per chunk of records: the markers and buckets of a chunk change in one atomic step."""
        for u in records:
            self._check(u)
        counted: list[int] = []
        for start in range(0, len(records), CHUNK):
            chunk = records[start : start + CHUNK]
            keys: list[str] = [DIRTY]
            args: list[object] = [self._marker_ttl, self._bucket_ttl, secrets.token_hex(8)]
            for u in chunk:
                hour = int(u.finished_at) // HOUR * HOUR
                keys += (f"mb:req:{u.request_id}", bucket_key(u.tenant, u.key_id, u.model, hour))
                args += (
                    u.tenant,
                    u.key_id,
                    u.model,
                    hour,
                    u.prompt_tokens,
                    u.completion_tokens,
                    u.outcome,
                    u.written_off_tokens,
                )
            counted += [int(c) for c in await self._record(keys=keys, args=args)]
        tokens: dict[str, list[int]] = {}
        for u, c in zip(records, counted, strict=True):
            if c:
                totals = tokens.setdefault(u.model, [0, 0, 0, 0, 0])
                at = 3 if u.outcome == "cached" else 0
                totals[at] += u.prompt_tokens
                totals[at + 1] += u.completion_tokens
                totals[2] += u.written_off_tokens
        prices = self._prices() if self._prices is not None else None
        for model, (prompt, completion, written_off, cached_prompt, cached_completion) in tokens.items():
            counts = (prompt, completion, written_off, cached_prompt, cached_completion)
            for kind, count in zip(TOKEN_KINDS, counts, strict=True):
                TOKENS.labels(model, kind).inc(count)
            if prices is not None:
                cost = prices.cost(
                    model,
                    prompt,
                    completion,
                    cached_prompt_tokens=cached_prompt,
                    cached_completion_tokens=cached_completion,
                )
                SPEND.labels(model, prices.currency).inc(float(cost))
        accepted = sum(counted)
        RECORDS.labels("accepted").inc(accepted)
        RECORDS.labels("duplicate").inc(len(records) - accepted)
        return accepted, len(records) - accepted

    async def dirty(self, limit: int = 1000) -> list[str]:
        """Buckets changed since the ledger last caught up with them."""
        return [k.decode() if isinstance(k, bytes) else k for k in await self._redis.srandmember(DIRTY, limit)]

    async def read(self, key: str) -> Bucket | None:
        raw = await self._redis.hgetall(key)
        if not raw:
            return None
        f = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        return Bucket(
            key=key,
            tenant=f["tenant"],
            key_id=f["key_id"],
            model=f["model"],
            hour=int(f["hour"]),
            requests=int(f.get("requests", 0)),
            prompt_tokens=int(f.get("prompt_tokens", 0)),
            completion_tokens=int(f.get("completion_tokens", 0)),
            completed=int(f.get("completed", 0)),
            cancelled=int(f.get("cancelled", 0)),
            failed=int(f.get("failed", 0)),
            version=f["version"],
            generation=f.get("generation", ""),
            written_off_tokens=int(f.get("written_off_tokens", 0)),
            cached=int(f.get("cached", 0)),
            cached_prompt_tokens=int(f.get("cached_prompt_tokens", 0)),
            cached_completion_tokens=int(f.get("cached_completion_tokens", 0)),
        )

    async def forget(self, key: str) -> None:
        await self._redis.srem(DIRTY, key)

    async def caught_up(self, bucket: Bucket) -> bool:
        """Marks the bucket clean unless it changed after it was read (then the next flush takes it)."""
        return int(await self._flushed(keys=[bucket.key, DIRTY], args=[bucket.version])) == 1
