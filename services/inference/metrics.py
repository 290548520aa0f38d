"""The engine's load as Prometheus gauges, read at scrape time: the autoscaling signal."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.inference.engine import Load

# The metric the inference HorizontalPodAutoscaler scales on (deploy/k8s).
QUEUE_DEPTH = "meshserve_inference_waiting_requests"
METRICS = {
    QUEUE_DEPTH: "Requests queued in the engine, waiting for a batch slot.",
    "meshserve_inference_running_requests": "Requests the engine is generating for.",
    "meshserve_inference_kv_cache_usage_ratio": "Fraction of the KV cache in use.",
    "meshserve_inference_in_flight_requests": "Generate calls this replica has open.",
}
# The engine's own count of generated tokens, warm-up included: billing's totals are checked against it.
GENERATED = "meshserve_inference_generation_tokens"


class LoadCollector(Collector):
    """Reports the current load of this replica's engine, labelled with its model."""

    def __init__(self, model: str, load: Callable[[], Load | None]) -> None:
        self._model = model
        self._load = load

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        load = self._load()
        if load is None:  # still loading: no numbers rather than zeros that look like an idle replica
            return
        values = {
            QUEUE_DEPTH: load.waiting,
            "meshserve_inference_running_requests": load.running,
            "meshserve_inference_kv_cache_usage_ratio": load.kv_cache_usage,
            "meshserve_inference_in_flight_requests": load.in_flight,
        }
        for name, value in values.items():
            family = GaugeMetricFamily(name, METRICS[name], labels=["model"])
            family.add_metric([self._model], float(value))
            yield family
        generated = CounterMetricFamily(GENERATED, "Tokens the engine generated.", labels=["model"])
        generated.add_metric([self._model], float(load.generation_tokens))
        yield generated
