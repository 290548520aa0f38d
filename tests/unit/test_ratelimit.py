"""Rate-limit rules and Envoy responses, without Redis."""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.service.ratelimit.v3 import rls_pb2

from services.ratelimit.decisions import DescriptorResult, RequestDecision
from services.ratelimit.rules import FailureMode, Kind, Limit, Rules, Scope
from services.ratelimit.servicers import rls_response
from services.ratelimit.windows import WindowState
from services.runtime.errors import InvalidArgument

ROOT = Path(__file__).resolve().parents[2]
RULES = {
    "default_plan": "basic",
    "failure_mode": {"requests": "closed"},
    "plans": {
        "basic": {
            "requests": {"key": {"per_second": 5, "per_minute": 100}, "tenant_model": {"per_minute": 50}},
            "tokens": {"key": {"per_minute": 1000}, "tenant": {"per_minute": 5000}},
        },
        "none": {},
    },
    "tenants": {"free-rider": "none"},
}


def test_limits_come_from_the_tenants_plan_with_the_keys_own_overrides() -> None:
    rules = Rules.parse(RULES)
    assert [(lim.limit, lim.seconds) for lim in rules.requests(Scope.KEY, "acme", key_id="k")] == [(5, 1), (100, 60)]
    assert [lim.limit for lim in rules.requests(Scope.KEY, "acme", key_id="k", key_rpm=7)] == [5, 7]
    assert rules.requests(Scope.TENANT, "acme") == []
    assert [lim.scope for lim in rules.tokens("acme", "k", key_tpm=10)] == [Scope.KEY, Scope.TENANT]
    assert rules.tokens("acme", "k", key_tpm=10)[0].limit == 10
    assert rules.tokens("free-rider", "k") == [] and rules.requests(Scope.KEY, "free-rider", key_id="k") == []
    assert rules.failure_mode(Kind.REQUESTS) is FailureMode.CLOSED
    assert rules.failure_mode(Kind.TOKENS) is FailureMode.OPEN


def test_every_window_of_a_tenant_shares_one_redis_cluster_slot() -> None:
    rules = Rules.parse(RULES)
    keys = [lim.redis_key for lim in rules.requests(Scope.KEY, "ac{me}", key_id="k")]
    keys += [lim.redis_key for lim in rules.tokens("ac{me}", "k")]
    keys += [rules.reservation_key("ac{me}", "r"), rules.estimate_key("ac{me}", "k", "m")]
    assert {k.split("{")[1].split("}")[0] for k in keys} == {"ac_me_"}
    # Different models, windows and keys never share a counter.
    distinct = rules.requests(Scope.TENANT_MODEL, "a", model="m1") + rules.requests(Scope.TENANT_MODEL, "a", model="m2")
    assert len({lim.redis_key for lim in distinct}) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"default_plan": "gold"}, "unknown plan 'gold'"),
        ({"tenants": {"x": "gold"}}, "x: unknown plan"),
        ({"plans": {"basic": {"requests": {"key": {"per_week": 1}}}}}, "per_week"),
        ({"plans": {"basic": {"requests": {"key": {"per_minute": 0}}}}}, "greater than or equal to 1"),
        ({"failure_mode": {"tokens": "sometimes"}}, "failure_mode.tokens"),
    ],
)
def test_bad_rules_name_what_is_wrong(change: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        Rules.parse({**RULES, **change})


def test_the_shipped_rules_parse() -> None:
    for path in [ROOT / "deploy/local/ratelimits.yaml", ROOT / "tests/e2e/ratelimits.yaml"]:
        assert Rules.from_yaml(path).plan_of("anyone")


def window(limit: int, seconds: int, used: int, reset: float) -> WindowState:
    return WindowState(Limit(Scope.KEY, limit, seconds, "k"), used, reset)


def test_an_over_limit_response_names_the_limit_and_says_when_to_retry() -> None:
    decision = RequestDecision(
        admitted=False,
        descriptors=(DescriptorResult(True, window(5, 1, 5, 0.4)), DescriptorResult(False, window(50, 60, 3, 30))),
        retry_after_seconds=0.4,
    )
    response = rls_response(decision)
    headers = {h.key: h.value for h in response.response_headers_to_add}
    assert response.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT
    assert headers == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "0.4s",
        "retry-after": "1",
    }
    assert response.statuses[0].current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.SECOND
    assert response.statuses[1].limit_remaining == 47
    assert response.raw_body == b"rate limit exceeded (5 requests per 1 s per key); retry after 0.4 s"


def test_an_admitted_response_carries_the_tightest_window() -> None:
    decision = RequestDecision(True, (DescriptorResult(False, window(100, 60, 10, 59.5)),), None)
    headers = {h.key: h.value for h in rls_response(decision).response_headers_to_add}
    assert headers == {
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "90",
        "x-ratelimit-reset-requests": "59.5s",
    }


def test_limits_beyond_envoys_uint32_fields_are_clamped() -> None:
    decision = RequestDecision(True, (DescriptorResult(False, window(10**12, 60, 1, 1.0)),), None)
    status = rls_response(decision).statuses[0]
    assert status.current_limit.requests_per_unit == status.limit_remaining == 2**32 - 1
