"""meshserve top's arithmetic: histogram quantiles and rates from two scrapes."""

from __future__ import annotations

import math

from services.cli.top import ITL, TTFT, quantile, summarize


def test_quantile_interpolates_inside_a_bucket_like_prometheus() -> None:
    buckets = {0.1: 10.0, 0.5: 30.0, 1.0: 40.0, math.inf: 40.0}
    assert quantile(0.25, buckets) == 0.1  # rank 10 is the top of the first bucket
    assert math.isclose(quantile(0.5, buckets), 0.1 + 0.4 * (20 - 10) / 20)
    assert math.isclose(quantile(0.95, buckets), 0.5 + 0.5 * (38 - 30) / 10)
    assert math.isnan(quantile(0.5, {0.1: 0.0, math.inf: 0.0}))
    assert quantile(0.99, {1.0: 0.0, math.inf: 5.0}) == 1.0  # all above the last finite bound


def test_rates_and_interval_percentiles_add_up_over_routers() -> None:
    def router(
        requests: float, completion: float, ttft_fast: float
    ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        m = (("model", "m"),)
        return {
            (
                "meshserve_router_requests_total",
                (("model", "m"), ("outcome", "completed"), ("version", "v1")),
            ): requests,
            ("meshserve_router_tokens_total", (("kind", "completion"), ("model", "m"), ("tenant", "t"))): completion,
            (f"{TTFT}_bucket", (("le", "0.1"), *m)): ttft_fast,
            (f"{TTFT}_bucket", (("le", "1.0"), *m)): requests,
            (f"{TTFT}_bucket", (("le", "+Inf"), *m)): requests,
            (f"{ITL}_bucket", (("le", "0.01"), *m)): completion,
            (f"{ITL}_bucket", (("le", "+Inf"), *m)): completion,
            ("meshserve_router_queue_depth", (("model", "m"), ("version", "v1"))): 3.0,
        }

    before = {"router": router(10, 100, 5), "router-2": router(0, 0, 0), "inference": None}
    after = {
        "router": router(20, 300, 10),
        "router-2": router(10, 100, 10),
        "inference": {
            ("meshserve_inference_running_requests", (("model", "m"),)): 2.0,
            ("meshserve_inference_kv_cache_usage_ratio", (("model", "m"),)): 0.25,
        },
    }
    s = summarize(before, after, 2.0)
    [row] = s.models
    assert (row.requests_per_s, row.completion_tokens_per_s, row.queued) == (10.0, 150.0, 6.0)
    # 20 first tokens in the interval: 15 under 0.1 s, 5 between 0.1 and 1 s.
    assert math.isclose(row.ttft_p50, 0.1 * 10 / 15)
    assert math.isclose(row.ttft_p95, 0.1 + 0.9 * (19 - 15) / 5)
    assert s.replicas[0].running == 2.0 and s.replicas[0].kv_cache == 0.25
    assert s.services == {"router": True, "router-2": True, "inference": True}
