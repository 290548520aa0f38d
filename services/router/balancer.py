"""Choosing a replica: live load, prefix and session affinity under a load bound, and ejection. Imports no gRPC."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from prometheus_client import Counter, Gauge

ROUTED = Counter(
    "meshserve_router_routed_total",
    "Requests sent to a replica, by why it was chosen (affinity, spill, least_load, round_robin).",
    ["replica", "reason"],
)
EJECTIONS = Counter("meshserve_router_ejections_total", "Replicas taken out of rotation after a failure.", ["replica"])
AVAILABLE = Gauge("meshserve_router_replica_available", "1 while a replica is in rotation.", ["replica"])


class Strategy(StrEnum):
    """How the router spreads requests over the replicas of a model version."""

    # Least load, except that requests sharing a prompt prefix (or a session) go to the same replica
    # while its load stays within the bound.
    AFFINITY = "affinity"
    LEAST_LOAD = "least_load"
    ROUND_ROBIN = "round_robin"


@dataclass(frozen=True)
class LoadReport:
    """What a replica last said about itself."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    # Requests the engine generates for at once (vLLM's max_num_seqs).
    capacity: int = 1
    # The capacity pool it runs in (spot, on-demand); empty: none.
    pool: str = ""
    # The quantization scheme and KV cache dtype its engine runs the model in (the model list says them).
    quantization: str = ""
    kv_cache_dtype: str = ""


class ReplicaState:
    """One replica as the router sees it: its last report, the calls this router has open on it, ejection."""

    def __init__(self, address: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        # None until the replica's load stream delivers a report, and again once the stream breaks.
        self.report: LoadReport | None = None
        self.in_flight = 0
        self.ejected_until = 0.0
        self._ejections = 0
        self._clock = clock
        self._last_chosen = 0
        AVAILABLE.labels(address).set(0)

    @property
    def available(self) -> bool:
        """In rotation: reporting its load, and not ejected (or its ejection has run out: a probe)."""
        return self.report is not None and self._clock() >= self.ejected_until

    @property
    def capacity(self) -> int:
        return max(1, self.report.capacity) if self.report is not None else 0

    @property
    def busy(self) -> int:
        """Requests on the replica: the engine's count, or this router's own if that is fresher and higher."""
        reported = self.report.running + self.report.waiting if self.report is not None else 0
        return max(reported, self.in_flight)

    def weighted_capacity(self, pool_weights: Mapping[str, float]) -> float:
        """Capacity as the balancer counts it: scaled by its pool's weight (1 for a pool without one)."""
        pool = self.report.pool if self.report is not None else ""
        return self.capacity * pool_weights.get(pool, 1.0)

    def reported(self, report: LoadReport | None) -> None:
        self.report = report
        AVAILABLE.labels(self.address).set(1 if self.available else 0)

    def eject(self, base_seconds: float, max_seconds: float) -> None:
        """Out of rotation for a while that doubles with each ejection in a row; it comes back as a probe."""
        self._ejections += 1
        self.ejected_until = self._clock() + min(max_seconds, base_seconds * 2 ** (self._ejections - 1))
        EJECTIONS.labels(self.address).inc()
        AVAILABLE.labels(self.address).set(0)

    def succeeded(self) -> None:
        """A call worked: the ejection backoff starts over."""
        self._ejections = 0
        if self.report is not None:
            AVAILABLE.labels(self.address).set(1)


def _rendezvous(key: str, address: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{address}".encode(), digest_size=8).digest(), "big")


class Balancer:
    """Picks one replica of a version for one request."""

    def __init__(self, strategy: Strategy = Strategy.AFFINITY, load_bound: float = 1.25, floor: float = 0.5) -> None:
        if load_bound < 1:
            raise ValueError("load_bound must be at least 1")
        self.strategy = strategy
        self._bound = load_bound
        # Utilization under which an affine replica takes the request whatever the others' load.
        self._floor = floor
        self._turn = 0

    def choose(
        self,
        replicas: Sequence[ReplicaState],
        affinity_key: str | None = None,
        exclude: Collection[str] = (),
        pool_weights: Mapping[str, float] | None = None,
    ) -> ReplicaState | None:
        """The replica for the request, or None when no replica is in rotation. pool_weights (the catalogue's)
        scale each replica's capacity by its pool: with spot at 2 and on-demand at 1, a spot replica is counted
        half as loaded as an on-demand one with the same requests, so spot fills first."""
        candidates = [r for r in replicas if r.available and r.address not in exclude]
        if not candidates:
            return None
        self._turn += 1
        weights = pool_weights or {}
        if self.strategy is Strategy.ROUND_ROBIN:
            chosen, reason = sorted(candidates, key=lambda r: r.address)[self._turn % len(candidates)], "round_robin"
        elif affinity_key is not None and self.strategy is Strategy.AFFINITY:
            chosen, reason = self._affine(candidates, affinity_key, weights)
        else:
            chosen, reason = self._least_loaded(candidates, weights), "least_load"
        chosen._last_chosen = self._turn
        ROUTED.labels(chosen.address, reason).inc()
        return chosen

    def _least_loaded(self, candidates: Sequence[ReplicaState], weights: Mapping[str, float]) -> ReplicaState:
        # Ties go to the replica chosen longest ago, so equal replicas take turns.
        return min(candidates, key=lambda r: (r.busy / r.weighted_capacity(weights), r._last_chosen))

    def _affine(
        self, candidates: Sequence[ReplicaState], key: str, weights: Mapping[str, float]
    ) -> tuple[ReplicaState, str]:
        # Replicas in the key's own rendezvous order; the first that can take the request without
        # overloading goes. A replica under half its capacity always can: batching one more request
        # costs an engine little, and the cached prefix saves its prefill. Above that, its utilization
        # may reach bound x the mean (consistent hashing with bounded loads). A hot prefix thus spills
        # to the key's second replica (which then caches it too), never piling onto one replica alone.
        total_busy = sum(r.busy for r in candidates) + 1
        total_capacity = sum(r.weighted_capacity(weights) for r in candidates)
        ceiling = max(self._floor, self._bound * total_busy / total_capacity)
        ordered = sorted(candidates, key=lambda r: _rendezvous(key, r.address), reverse=True)
        for rank, replica in enumerate(ordered):
            if (replica.busy + 1) / replica.weighted_capacity(weights) <= ceiling:
                return replica, "affinity" if rank == 0 else "spill"
        return self._least_loaded(candidates, weights), "least_load"
