"""`meshserve top`: a live summary of the running mesh, read from every service's /metrics.

Two scrapes some seconds apart give rates (requests and tokens per second) and percentiles over that
interval (TTFT and inter-token latency from the routers' histogram buckets); gauges (queue depth, KV-cache
use, running and waiting requests) are shown as they are now. Imports no gRPC.
"""

from __future__ import annotations

import json
import math
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

TTFT = "meshserve_router_time_to_first_token_seconds"
ITL = "meshserve_router_inter_token_latency_seconds"
Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


def discover(state: Path) -> dict[str, str]:
    """The /metrics URL of every service of the mesh whose state folder this is, by service name."""
    urls = {}
    for ready in sorted(state.glob("*.ready.json")):
        info = json.loads(ready.read_text())
        if info.get("metrics_port"):
            host = info.get("host") or "127.0.0.1"
            urls[ready.name.removesuffix(".ready.json")] = f"http://{host}:{info['metrics_port']}/metrics"
    return urls


def scrape(url: str, timeout: float = 2.0) -> Samples | None:
    """Every sample of one endpoint; None when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = r.read().decode()
    except OSError:
        return None
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _select(samples: Samples, name: str) -> Iterable[tuple[dict[str, str], float]]:
    for (n, labels), v in samples.items():
        if n == name:
            yield dict(labels), v


def quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' histogram_quantile over cumulative bucket counts {upper bound: count}; NaN when empty."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return math.nan
    total = buckets[bounds[-1]]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return bounds[-1]


@dataclass
class ModelRow:
    model: str
    requests_per_s: float = 0.0
    failed_per_s: float = 0.0
    prompt_tokens_per_s: float = 0.0
    completion_tokens_per_s: float = 0.0
    ttft_p50: float = math.nan
    ttft_p95: float = math.nan
    itl_p50: float = math.nan
    queued: float = 0.0
    in_flight: float = 0.0


@dataclass
class ReplicaRow:
    service: str
    model: str
    running: float
    waiting: float
    kv_cache: float


@dataclass
class Summary:
    models: list[ModelRow] = field(default_factory=list)
    replicas: list[ReplicaRow] = field(default_factory=list)
    # Service name -> whether its /metrics answered.
    services: dict[str, bool] = field(default_factory=dict)


def as_json(summary: Summary) -> str:
    """The summary for scripts: rates per second, latencies in seconds, null where nothing was measured."""

    def clean(value: object) -> object:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(asdict(summary)), indent=2)


def _add_bucket_deltas(before: Samples, after: Samples, name: str, per_model: dict[str, dict[float, float]]) -> None:
    for labels, v in _select(after, name + "_bucket"):
        buckets = per_model.setdefault(labels.get("model", ""), defaultdict(float))
        key = tuple(sorted(labels.items()))
        buckets[float(labels["le"])] += v - before.get((name + "_bucket", key), 0.0)


def summarize(before: dict[str, Samples | None], after: dict[str, Samples | None], seconds: float) -> Summary:
    """Rates and interval percentiles from two scrapes of every service, `seconds` apart."""
    summary = Summary(services={name: samples is not None for name, samples in after.items()})
    models: dict[str, ModelRow] = {}
    # Histogram -> model -> {upper bound: observations in the interval}, summed over every router.
    histograms: dict[str, dict[str, dict[float, float]]] = {TTFT: {}, ITL: {}}
    for name, now in after.items():
        then = before.get(name) or {}
        if now is None:
            continue

        def rate(sample: str, labels: dict[str, str], value: float, then: Samples = then) -> float:
            return max(0.0, value - then.get((sample, tuple(sorted(labels.items()))), 0.0)) / seconds

        for labels, v in _select(now, "meshserve_router_requests_total"):
            row = models.setdefault(labels["model"], ModelRow(labels["model"]))
            row.requests_per_s += rate("meshserve_router_requests_total", labels, v)
            if labels.get("outcome") == "failed":
                row.failed_per_s += rate("meshserve_router_requests_total", labels, v)
        for labels, v in _select(now, "meshserve_router_tokens_total"):
            row = models.setdefault(labels["model"], ModelRow(labels["model"]))
            r = rate("meshserve_router_tokens_total", labels, v)
            if labels.get("kind") == "prompt":
                row.prompt_tokens_per_s += r
            else:
                row.completion_tokens_per_s += r
        for labels, v in _select(now, "meshserve_router_queue_depth"):
            models.setdefault(labels["model"], ModelRow(labels["model"])).queued += v
        for labels, v in _select(now, "meshserve_router_in_flight"):
            models.setdefault(labels["model"], ModelRow(labels["model"])).in_flight += v
        for histogram, per_model in histograms.items():
            _add_bucket_deltas(then, now, histogram, per_model)
        gauges: dict[str, dict[str, float]] = defaultdict(dict)
        for metric in ("running_requests", "waiting_requests", "kv_cache_usage_ratio"):
            for labels, v in _select(now, f"meshserve_inference_{metric}"):
                gauges[labels.get("model", "")][metric] = v
        for model, g in gauges.items():
            summary.replicas.append(
                ReplicaRow(
                    name,
                    model,
                    g.get("running_requests", 0.0),
                    g.get("waiting_requests", 0.0),
                    g.get("kv_cache_usage_ratio", 0.0),
                )
            )
    for model, row in models.items():
        ttft, itl = histograms[TTFT].get(model), histograms[ITL].get(model)
        if ttft:
            row.ttft_p50, row.ttft_p95 = quantile(0.5, ttft), quantile(0.95, ttft)
        if itl:
            row.itl_p50 = quantile(0.5, itl)
    summary.models = sorted(models.values(), key=lambda r: r.model)
    return summary
