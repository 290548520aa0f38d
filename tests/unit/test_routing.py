"""Replica choice, ejection and backpressure, without gRPC: least load, bounded affinity, queues."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from services.mesh.local import core_sets
from services.router.admission import Admission
from services.router.balancer import Balancer, LoadReport, ReplicaState, Strategy
from services.router.catalogue import Version
from services.router.failover import Failover, RoutingPolicy
from services.router.fleet import Fleet
from services.runtime.errors import LimitsUnavailable, ResourceExhausted, Unavailable
from tests.unit.test_completions import FakeDirectory, FakeReplica


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def replicas(*busy: int, capacity: int = 8, clock: Clock | None = None) -> list[ReplicaState]:
    out = []
    for i, running in enumerate(busy):
        state = ReplicaState(f"10.0.0.{i + 1}:50051", clock=clock or Clock())
        state.reported(LoadReport(running=running, capacity=capacity))
        out.append(state)
    return out


def test_least_load_picks_the_idlest_and_equal_replicas_take_turns() -> None:
    balancer = Balancer(Strategy.LEAST_LOAD)
    busy, idle = replicas(5, 1)
    assert balancer.choose([busy, idle]) is idle
    a, b = replicas(0, 0)
    assert Counter(balancer.choose([a, b]).address for _ in range(10)) == {a.address: 5, b.address: 5}  # type: ignore[union-attr]


def test_load_is_relative_to_capacity_and_counts_this_routers_own_calls() -> None:
    balancer = Balancer(Strategy.LEAST_LOAD)
    big, small = replicas(4, 2)
    big.report = LoadReport(running=4, capacity=64)
    small.report = LoadReport(running=2, capacity=4)
    assert balancer.choose([big, small]) is big
    fresh, stale = replicas(0, 0)
    stale.in_flight = 3  # sent since its last report
    assert balancer.choose([fresh, stale]) is fresh


def test_a_shared_prefix_stays_on_one_replica_until_the_load_bound_then_spills_to_one_other() -> None:
    balancer = Balancer(Strategy.AFFINITY, load_bound=1.25)
    fleet = replicas(0, 0, 0)
    first = balancer.choose(fleet, "system prompt A")
    assert first is not None
    assert all(balancer.choose(fleet, "system prompt A") is first for _ in range(20))
    # Piling the prefix's requests on: up to half its capacity on the affine replica, then they spill,
    # always to the key's second replica first, and the load stays within the bound.
    chosen = []
    for _ in range(12):
        replica = balancer.choose(fleet, "system prompt A")
        assert replica is not None
        replica.in_flight += 1
        chosen.append(replica)
    assert chosen[:4] == [first] * 4
    second = chosen[4]
    assert second is not first and chosen[5:8] == [second] * 3
    assert max(r.in_flight for r in fleet) <= 5


def test_different_prefixes_spread_over_the_replicas() -> None:
    balancer = Balancer(Strategy.AFFINITY)
    fleet = replicas(0, 0, 0)
    homes = {balancer.choose(fleet, f"prefix {i}").address for i in range(30)}  # type: ignore[union-attr]
    assert len(homes) == 3


def test_round_robin_ignores_affinity_and_load() -> None:
    balancer = Balancer(Strategy.ROUND_ROBIN)
    fleet = replicas(9, 0)
    picks = [balancer.choose(fleet, "same prefix").address for _ in range(4)]  # type: ignore[union-attr]
    assert picks.count(fleet[0].address) == 2


def test_an_ejected_replica_is_skipped_then_probed_back_with_a_growing_backoff() -> None:
    clock = Clock()
    balancer = Balancer(Strategy.LEAST_LOAD)
    bad, good = replicas(0, 5, clock=clock)
    bad.eject(1.0, 30.0)
    assert balancer.choose([bad, good]) is good
    clock.now += 1.0
    assert balancer.choose([bad, good]) is bad  # the probe
    bad.eject(1.0, 30.0)
    clock.now += 1.0
    assert not bad.available  # second ejection in a row: 2 s
    clock.now += 1.0
    assert bad.available
    bad.succeeded()
    bad.eject(1.0, 30.0)
    clock.now += 1.0
    assert bad.available  # a success reset the backoff


def test_pool_weights_fill_the_preferred_pool_first_and_spill_to_the_other() -> None:
    # Spot weighted 2, on-demand 1 (the catalogue's pool_weights): a spot replica counts half as loaded.
    weights = {"spot": 2.0, "on-demand": 1.0}
    spot, on_demand = replicas(0, 0, capacity=4)
    spot.reported(LoadReport(running=0, capacity=4, pool="spot"))
    on_demand.reported(LoadReport(running=0, capacity=4, pool="on-demand"))
    balancer = Balancer(Strategy.LEAST_LOAD)
    # Spot with 3 of 4 running (3/8 weighted) takes the request before on-demand with 2 of 4 (2/4)...
    spot.report = LoadReport(running=3, capacity=4, pool="spot")
    on_demand.report = LoadReport(running=2, capacity=4, pool="on-demand")
    assert balancer.choose([spot, on_demand], pool_weights=weights) is spot
    # ...which without weights (or for a pool without one) would have gone to on-demand (3/4 against 2/4).
    assert balancer.choose([spot, on_demand]) is on_demand
    assert balancer.choose([spot, on_demand], pool_weights={"other": 5.0}) is on_demand
    # Past its weighted share spot spills to on-demand: 5/8 against 2/4.
    spot.report = LoadReport(running=5, capacity=4, pool="spot")
    assert balancer.choose([spot, on_demand], pool_weights=weights) is on_demand
    # Affinity's load bound is over weighted capacity too: the key's replica spills only past it.
    affine = Balancer(Strategy.AFFINITY)
    spot.report = LoadReport(running=3, capacity=4, pool="spot")
    on_demand.report = LoadReport(running=0, capacity=4, pool="on-demand")
    chosen = {affine.choose([spot, on_demand], f"key-{i}", pool_weights={"spot": 10.0}) for i in range(20)}
    assert chosen == {spot, on_demand}  # (3+1)/40 is under the floor: keys keep their replica


def test_no_replica_in_rotation_is_none() -> None:
    silent = ReplicaState("10.0.0.9:50051")
    assert Balancer().choose([silent]) is None
    (one,) = replicas(0)
    assert Balancer().choose([one], exclude={one.address}) is None


async def test_admission_runs_up_to_capacity_queues_then_refuses_fast_with_a_retry_delay() -> None:
    admission = Admission(queue_size=2, queue_timeout_seconds=5)
    release = asyncio.Event()
    started: list[int] = []

    async def request(i: int) -> None:
        async with admission.slot(("m", "v1"), lambda: 2):
            started.append(i)
            await release.wait()

    running = [asyncio.create_task(request(i)) for i in range(4)]
    await asyncio.sleep(0.01)
    assert started == [0, 1] and admission.depth(("m", "v1")) == 2
    with pytest.raises(ResourceExhausted) as refused:
        await request(4)
    assert refused.value.retry_after_seconds is not None and refused.value.retry_after_seconds >= 1
    release.set()
    await asyncio.gather(*running)
    assert sorted(started) == [0, 1, 2, 3] and admission.depth(("m", "v1")) == 0


async def test_a_queued_request_times_out_as_resource_exhausted() -> None:
    admission = Admission(queue_size=4, queue_timeout_seconds=0.05)
    async with admission.slot(("m", "v1"), lambda: 1):
        with pytest.raises(ResourceExhausted, match="stayed at capacity"):
            async with admission.slot(("m", "v1"), lambda: 1):
                pass


async def test_no_capacity_at_all_is_unavailable_at_once() -> None:
    with pytest.raises(Unavailable) as refused:
        async with Admission(4, 5).slot(("m", "v1"), lambda: 0):
            pass
    assert refused.value.retry_after_seconds


async def test_a_queued_client_that_leaves_hands_its_turn_on() -> None:
    admission = Admission(queue_size=4, queue_timeout_seconds=5)
    entered: list[str] = []
    hold = asyncio.Event()

    async def request(name: str) -> None:
        async with admission.slot(("m", "v1"), lambda: 1):
            entered.append(name)
            await hold.wait()

    first = asyncio.create_task(request("first"))
    await asyncio.sleep(0)
    leaver = asyncio.create_task(request("leaver"))
    stayer = asyncio.create_task(request("stayer"))
    await asyncio.sleep(0.01)
    leaver.cancel()
    hold.set()
    await asyncio.gather(first, stayer)
    assert entered == ["first", "stayer"]


async def test_capacity_that_grows_lets_queued_requests_in() -> None:
    admission = Admission(queue_size=4, queue_timeout_seconds=5)
    capacity = 1
    hold = asyncio.Event()
    entered = 0

    async def request() -> None:
        nonlocal entered
        async with admission.slot(("m", "v1"), lambda: capacity):
            entered += 1
            await hold.wait()

    tasks = [asyncio.create_task(request()) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert entered == 1
    capacity = 3
    admission.wake(("m", "v1"), lambda: capacity)
    await asyncio.sleep(0.01)
    assert entered == 3
    hold.set()
    await asyncio.gather(*tasks)


async def test_a_dns_target_resolves_to_one_state_per_address_and_stays_out_of_rotation_until_it_reports() -> None:
    targets = {"dns:///localhost:1", "127.0.0.1:2"}
    fleet = Fleet(lambda: targets, resolve_seconds=3600)
    await fleet.sync()
    try:
        addresses = {s.address for s in fleet.states(["dns:///localhost:1"])}
        assert "127.0.0.1:1" in addresses
        assert [s.address for s in fleet.states(["127.0.0.1:2"])] == ["127.0.0.1:2"]
        # Nothing listens there: no load report, so nothing is in rotation.
        assert not any(s.available for s in fleet.states(sorted(targets)))
        targets.discard("127.0.0.1:2")
        await fleet.sync()
        assert fleet.states(["127.0.0.1:2"]) == []
    finally:
        await fleet.close()


def test_several_cpu_engines_get_disjoint_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert core_sets(1) == ["auto"]
    assert core_sets(2) == ["0,1", "2,3"]
    assert core_sets(6) == ["nobind"] * 6


class _Refusing(FakeReplica):
    """A replica whose every try fails before its first step with the given error."""

    def __init__(self, address: str, error: Exception) -> None:
        super().__init__([], address=address)
        self.error, self.tries = error, 0

    async def serve(self) -> AsyncIterator[str]:
        self.tries += 1
        raise self.error
        yield ""


@pytest.mark.parametrize(
    ("error", "ejected"),
    [(Unavailable("replica down"), True), (LimitsUnavailable("spend limits cannot be checked right now"), False)],
)
async def test_only_the_replicas_own_failure_ejects_it(error: Exception, ejected: bool) -> None:
    """A request whose limits cannot be checked (Redis away, failing closed) is refused as Unavailable, and the
    replica it was to run on stays in rotation: the fault is not the replica's, and no other replica is tried."""
    first, second = _Refusing("10.0.0.1:50051", error), _Refusing("10.0.0.2:50051", error)
    directory = FakeDirectory(first, second)
    failover = Failover(directory, Balancer(Strategy.ROUND_ROBIN), RoutingPolicy())
    version = Version("v1", 1.0, (first.address, second.address))
    with pytest.raises(type(error)):
        async for _ in failover.steps(lambda replica: replica.serve(), "r", "m", version, None):
            pass
    assert first.tries + second.tries == (2 if ejected else 1)
    assert all(s.available for s in directory.state.values()) is not ejected
