"""Rate-limit replicas on real Redis: shared counts, Envoy's contract, token budgets, and Redis going away."""

from __future__ import annotations

import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from meshserve.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc
from services.mesh.local import LocalMesh, MeshOptions

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    m = LocalMesh(MeshOptions(state_dir=tmp_path_factory.mktemp("rl"), model="m", model_store=Path("unused")))
    try:
        m.start_redis()
        for name, rules in [("rl-a", "open"), ("rl-b", "open"), ("rl-closed", "closed")]:
            m.wait_serving(m.start_ratelimit(name, HERE / f"ratelimits-{rules}.yaml"), 30)
        yield m
    finally:
        m.stop()


def rls(mesh: LocalMesh, replica: str, key_id: str, tenant: str = "acme") -> rls_pb2.RateLimitResponse:
    request = rls_pb2.RateLimitRequest(domain="meshserve")
    entries = request.descriptors.add().entries
    entries.add(key="tenant", value=tenant)
    entries.add(key="key_id", value=key_id)
    entries.add(key="key_rpm", value="0")
    request.descriptors.add().entries.add(key="tenant", value=tenant)
    with mesh.channel(replica, "edge") as channel:
        return rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(request, timeout=5)


def budget(mesh: LocalMesh, replica: str) -> ratelimit_pb2_grpc.TokenBudgetServiceStub:
    channel = mesh.channel(replica, "router")
    return ratelimit_pb2_grpc.TokenBudgetServiceStub(channel)


def test_two_replicas_share_one_count(mesh: LocalMesh) -> None:
    key = "key_" + secrets.token_hex(4)
    codes = [rls(mesh, ("rl-a", "rl-b")[i % 2], key).overall_code for i in range(16)]
    assert codes.count(rls_pb2.RateLimitResponse.OK) == 10
    assert codes[10:] == [rls_pb2.RateLimitResponse.OVER_LIMIT] * 6


def test_an_over_limit_answer_tells_envoy_what_to_send(mesh: LocalMesh) -> None:
    key = "key_" + secrets.token_hex(4)
    first = rls(mesh, "rl-a", key)
    headers = {h.key: h.value for h in first.response_headers_to_add}
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "9"
    assert first.statuses[0].current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.MINUTE
    for _ in range(9):
        rls(mesh, "rl-b", key)
    over = rls(mesh, "rl-a", key)
    headers = {h.key: h.value for h in over.response_headers_to_add}
    assert over.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT
    assert [s.code for s in over.statuses] == [rls_pb2.RateLimitResponse.OVER_LIMIT, rls_pb2.RateLimitResponse.OK]
    assert 1 <= int(headers["retry-after"]) <= 60
    assert b"10 requests per 60 s per key" in over.raw_body


def test_an_unknown_domain_or_descriptor_is_an_invalid_argument(mesh: LocalMesh) -> None:
    with mesh.channel("rl-a", "edge") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        with pytest.raises(grpc.RpcError) as bad_domain:
            stub.ShouldRateLimit(rls_pb2.RateLimitRequest(domain="other"), timeout=5)
        request = rls_pb2.RateLimitRequest(domain="meshserve")
        request.descriptors.add().entries.add(key="remote_address", value="1.2.3.4")
        with pytest.raises(grpc.RpcError) as bad_entry:
            stub.ShouldRateLimit(request, timeout=5)
    assert bad_domain.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_entry.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def caller(key_id: str) -> ratelimit_pb2.Caller:
    return ratelimit_pb2.Caller(tenant="acme", key_id=key_id)


def test_tokens_reserved_on_one_replica_settle_on_the_other(mesh: LocalMesh) -> None:
    who = caller("key_" + secrets.token_hex(4))
    a, b = budget(mesh, "rl-a"), budget(mesh, "rl-b")
    held = a.Reserve(
        ratelimit_pb2.ReserveRequest(request_id="r1", caller=who, model="m", prompt_tokens=100, max_tokens=800),
        timeout=5,
    )
    assert (held.reserved_tokens, held.enforced) == (900, True)
    with pytest.raises(grpc.RpcError) as refused:
        b.Reserve(
            ratelimit_pb2.ReserveRequest(request_id="r2", caller=who, model="m", prompt_tokens=50, max_tokens=100),
            timeout=5,
        )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after", "60") in (refused.value.trailing_metadata() or ())
    settle = ratelimit_pb2.SettleRequest(
        request_id="r1",
        caller=who,
        model="m",
        prompt_tokens=100,
        completion_tokens=40,
        outcome=ratelimit_pb2.OUTCOME_CANCELLED,
    )
    assert b.Settle(settle, timeout=5).returned_tokens == 760
    assert not a.Settle(settle, timeout=5).settled  # a retried settlement changes nothing
    windows = a.GetBudget(ratelimit_pb2.GetBudgetRequest(caller=who), timeout=5).windows
    assert [(w.scope, w.limit, w.used) for w in windows] == [("key", 1000, 140)]
    assert b.Reserve(
        ratelimit_pb2.ReserveRequest(request_id="r2", caller=who, model="m", prompt_tokens=50, max_tokens=100),
        timeout=5,
    ).enforced


def metric(mesh: LocalMesh, replica: str, line: str) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.procs[replica].metrics_port}/metrics", timeout=5) as r:
        return line in r.read().decode()


def test_redis_going_away_follows_each_failure_mode_and_limiting_returns_with_it(mesh: LocalMesh) -> None:
    key = "key_" + secrets.token_hex(4)
    for _ in range(10):
        rls(mesh, "rl-a", key)
    assert rls(mesh, "rl-a", key).overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT
    port = mesh.procs["redis"].grpc_port
    mesh.stop_proc(mesh.procs["redis"])
    try:
        # Fail open: requests and token reservations pass, marked unenforced.
        assert rls(mesh, "rl-a", key).overall_code == rls_pb2.RateLimitResponse.OK
        reserve = ratelimit_pb2.ReserveRequest(
            request_id="down", caller=caller(key), model="m", prompt_tokens=1, max_tokens=1
        )
        assert not budget(mesh, "rl-a").Reserve(reserve, timeout=5).enforced
        assert metric(mesh, "rl-a", 'meshserve_ratelimit_redis_up{kind="requests"} 0.0')
        assert metric(mesh, "rl-a", 'meshserve_ratelimit_decisions_total{kind="requests",outcome="failed_open"}')
        assert "redis unreachable; requests limits fail open" in mesh.procs["rl-a"].log.read_text()
        # Fail closed: refused as unavailable, which Envoy turns into a 503.
        with pytest.raises(grpc.RpcError) as closed:
            rls(mesh, "rl-closed", key)
        assert closed.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as closed_tokens:
            budget(mesh, "rl-closed").Reserve(reserve, timeout=5)
        assert closed_tokens.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        mesh.start_redis(port)
    # Same Redis (its append-only file kept the counts): limiting is back without a restart.
    assert rls(mesh, "rl-a", key).overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT
    assert rls(mesh, "rl-closed", key).overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT
    assert metric(mesh, "rl-a", 'meshserve_ratelimit_redis_up{kind="requests"} 1.0')


def test_a_generations_first_reservation_counts_it_in_the_same_windows_as_the_edges_check(mesh: LocalMesh) -> None:
    who = caller("key_" + secrets.token_hex(4))  # 10 requests and 1000 tokens per minute per key
    a, b = budget(mesh, "rl-a"), budget(mesh, "rl-b")

    def first(stub: ratelimit_pb2_grpc.TokenBudgetServiceStub, rid: str, hold: int, tokens: int = 0) -> object:
        request = ratelimit_pb2.ReserveRequest(
            request_id=rid, caller=who, model="m", prompt_tokens=tokens, max_tokens=0, count_request=True, hold=hold
        )
        return stub.Reserve(request, timeout=5)

    # A guess that does not fit is counted, not held and not refused: the measured counts decide after.
    guessed = first(a, "g", ratelimit_pb2.HOLD_IF_ROOM, tokens=5000)
    assert not guessed.held and guessed.requests.limit == 10 and guessed.requests.remaining == 9
    fits = first(b, "f", ratelimit_pb2.HOLD_IF_ROOM, tokens=100)
    assert fits.held and fits.reserved_tokens == 100 and fits.requests.remaining == 8
    for i in range(8):
        counted = first((a, b)[i % 2], f"r{i}", ratelimit_pb2.HOLD_NONE)
        assert not counted.held and counted.requests.remaining == 7 - i
    # The edge's check and the router's count are one count.
    assert rls(mesh, "rl-a", who.key_id).overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT
    with pytest.raises(grpc.RpcError) as refused:
        first(b, "over", ratelimit_pb2.HOLD_IF_ROOM, tokens=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "10 requests per 60 s per key" in (refused.value.details() or "")
    assert any(k == "retry-after" for k, _ in refused.value.trailing_metadata() or ())
    windows = a.GetBudget(ratelimit_pb2.GetBudgetRequest(caller=who), timeout=5).windows
    assert [w.used for w in windows] == [100]  # the refused request held nothing
