"""The response cache: deterministic requests answered again from Redis, exactly as the engine answered them.

A request is deterministic when it asks for one choice at temperature 0, or gives a seed. Its answer is kept
under its canonical request (every field, sorted), the model version that made it, whether it streams, and
its tenant (or every tenant, where the catalogue shares the model's cache), for a TTL and within a memory
bound (the least recently used answers go first, two Lua scripts keep the bound exact across routers). A
streamed answer is kept as its events and replayed as such, `data: [DONE]` included; a whole one as its
body. A request's `Cache-Control: no-cache` skips the lookup, `no-store` the lookup and the keeping.

Only answers that finished (stop or length) are kept: never one that failed, was cancelled, or stopped at a
spend budget. Redis away is a miss (logged and counted), never a failed request. Imports no gRPC.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from services.router import metrics

log = logging.getLogger(__name__)

HEADER = "x-meshserve-cache"
HIT, MISS = "hit", "miss"
# Every key in one Redis Cluster hash slot: the scripts touch an answer and the shared index together.
PREFIX = "{mc}"
RECENCY, SIZES, HELD = f"{PREFIX}:recency", f"{PREFIX}:sizes", f"{PREFIX}:bytes"


def deterministic(fields: dict[str, Any]) -> bool:
    """Whether a request's answer is the same each time: one choice, at temperature 0 or with a seed."""
    n = fields.get("n")
    if n is not None and n != 1:
        return False
    temperature = fields.get("temperature")
    greedy = isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0
    seeded = isinstance(fields.get("seed"), int) and not isinstance(fields.get("seed"), bool)
    return greedy or seeded


def directive(cache_control: str | None) -> tuple[bool, bool]:
    """(read, keep): what a request's Cache-Control lets the cache do. no-cache: answer afresh (and keep the
    fresh answer); no-store: neither read nor keep."""
    said = {part.strip().split("=", 1)[0].lower() for part in (cache_control or "").split(",")}
    return "no-cache" not in said and "no-store" not in said, "no-store" not in said


def key_of(model: str, owner: str, version: str, endpoint: int, stream: bool, fields: dict[str, Any]) -> str:
    """The answer's key: the model (for per-model counts), then a digest of who may read it (a tenant, or
    "*" where shared), the version, the endpoint, whether it streams, and the canonical request."""
    canonical = json.dumps({**fields, "stream": stream}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.blake2b(digest_size=20)
    for part in (owner, version, str(endpoint), canonical):
        digest.update(part.encode())
        digest.update(b"\0")
    return f"{PREFIX}:{model}:{digest.hexdigest()}"


def model_of(key: str) -> str:
    return key.removeprefix(f"{PREFIX}:").rsplit(":", 1)[0]


@dataclass(frozen=True)
class Plan:
    """What the cache does for one request: where its answer is kept, and whether it is read and kept."""

    key: str
    model: str
    read: bool
    keep: bool


@dataclass(frozen=True)
class Answer:
    """A finished answer as its client received it: its events (a whole reply is one), the request id it was
    made under, and the tokens it reported."""

    request_id: str
    events: tuple[bytes, ...]
    prompt_tokens: int
    completion_tokens: int

    def encode(self) -> str:
        events = [e.decode() for e in self.events]
        return json.dumps({"id": self.request_id, "p": self.prompt_tokens, "c": self.completion_tokens, "e": events})

    @classmethod
    def decode(cls, raw: str | bytes) -> Answer:
        d = json.loads(raw)
        return cls(str(d["id"]), tuple(e.encode() for e in d["e"]), int(d["p"]), int(d["c"]))

    def size(self) -> int:
        return sum(len(e) for e in self.events)

    def replayed(self, request_id: str) -> tuple[bytes, ...]:
        """The events under a new request's id (each response has its own, as the engine's would)."""
        old, new = self.request_id.encode(), request_id.encode()
        return tuple(e.replace(old, new) for e in self.events)


def _script(name: str) -> str:
    return resources.files("services.router").joinpath(name).read_text()


class ResponseCache:
    """Answers in Redis (redis.asyncio.Redis), under a TTL and a bound on the bytes held."""

    def __init__(
        self,
        redis: Any,
        ttl_seconds: int,
        max_bytes: int,
        max_entry_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ttl = ttl_seconds
        self._max_bytes = max_bytes
        self._max_entry = min(max_entry_bytes, max_bytes)
        self._clock = clock
        self._get = redis.register_script(_script("cache_get.lua"))
        self._put = redis.register_script(_script("cache_put.lua"))
        self._keeping: set[asyncio.Task[None]] = set()

    def fits(self, size: int) -> bool:
        """Whether an answer of size bytes may be kept."""
        return size <= self._max_entry

    async def get(self, plan: Plan) -> Answer | None:
        """The answer kept for the plan's request, or None (a miss; Redis away is one too)."""
        try:
            raw = await self._get(keys=[plan.key, RECENCY], args=[self._clock()])
            answer = Answer.decode(raw) if raw is not None else None
        except Exception as exc:  # a cache that cannot answer is a miss, never a failed request
            log.warning("response cache lookup failed; answering afresh", extra={"error": str(exc)[:200]})
            metrics.CACHE_LOOKUPS.labels(plan.model, "error").inc()
            return None
        metrics.CACHE_LOOKUPS.labels(plan.model, HIT if answer is not None else MISS).inc()
        return answer

    def keep(self, plan: Plan, answer: Answer) -> None:
        """Keeps a finished answer, in the background (the client has it already)."""
        if not plan.keep or not self.fits(answer.size()):
            return
        task = asyncio.ensure_future(self._kept(plan, answer))
        self._keeping.add(task)
        task.add_done_callback(self._keeping.discard)

    async def _kept(self, plan: Plan, answer: Answer) -> None:
        try:
            value = answer.encode()
            held, *evicted = await self._put(
                keys=[plan.key, RECENCY, SIZES, HELD], args=[value, self._ttl, self._clock(), self._max_bytes]
            )
        except Exception as exc:
            log.warning("response cache could not keep an answer", extra={"error": str(exc)[:200]})
            return
        metrics.CACHE_STORED_BYTES.labels(plan.model).inc(len(value))
        metrics.CACHE_HELD_BYTES.set(int(held))
        for key in evicted:
            metrics.CACHE_EVICTIONS.labels(model_of(key.decode() if isinstance(key, bytes) else key)).inc()

    async def settled(self) -> None:
        """Waits for answers being kept (tests, shutdown)."""
        if self._keeping:
            await asyncio.gather(*self._keeping, return_exceptions=True)
