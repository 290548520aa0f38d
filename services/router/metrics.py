"""What the router measures of each generation: outcome, queue wait, time to first token, inter-token latency,
and tokens per model and tenant. Label sets stay bounded: models, versions and tenants, never key ids or
request text. Imports no gRPC."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "meshserve_router_requests_total",
    "Generations that were admitted, by model, version and outcome (completed, cancelled, failed; cached:"
    " answered from the response cache).",
    ["model", "version", "outcome"],
)
QUEUE_WAIT = Histogram(
    "meshserve_router_queue_wait_seconds",
    "Time a request waited for a replica slot.",
    ["model"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TTFT = Histogram(
    "meshserve_router_time_to_first_token_seconds",
    "Time from the router receiving a request to the first generated token, queueing included.",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
)
ITL = Histogram(
    "meshserve_router_inter_token_latency_seconds",
    "Time between generated tokens after the first, per token.",
    ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5),
)
TOKENS = Counter(
    "meshserve_router_tokens_total",
    "Tokens of finished generations, by model, tenant and kind (prompt, completion).",
    ["model", "tenant", "kind"],
)
STOPPED_AT_BUDGET = Counter(
    "meshserve_router_stopped_at_budget_total",
    "Generations ended early because no spend budget had room for more tokens, by model.",
    ["model"],
)

BACKENDS = Counter(
    "meshserve_router_backend_requests_total",
    "Generations by the backend that took them (local, or a provider) and why (local, only, fallback, overflow).",
    ["model", "backend", "use"],
)
CACHE_LOOKUPS = Counter(
    "meshserve_router_cache_lookups_total",
    "Response cache lookups of deterministic requests, by model and result (hit, miss, error: Redis away).",
    ["model", "result"],
)
CACHE_STORED_BYTES = Counter(
    "meshserve_router_cache_stored_bytes_total", "Bytes of answers kept in the response cache, by model.", ["model"]
)
CACHE_EVICTIONS = Counter(
    "meshserve_router_cache_evictions_total",
    "Answers evicted from the response cache to keep it within its memory bound, by model.",
    ["model"],
)
CACHE_HELD_BYTES = Gauge(
    "meshserve_router_cache_bytes", "Bytes the response cache held (every model, every router) after its last write."
)


class GenerationTimer:
    """Times one generation's tokens as its steps arrive."""

    def __init__(self, model: str, started: float) -> None:
        self._model = model
        self._started = started
        self._itl = ITL.labels(model)
        self._last_at = 0.0
        self._last_tokens = 0

    def admitted(self, at: float) -> None:
        QUEUE_WAIT.labels(self._model).observe(at - self._started)

    def step(self, at: float, completion_tokens: int) -> None:
        """A step arrived carrying completion_tokens in total so far."""
        if self._last_at == 0.0:
            TTFT.labels(self._model).observe(at - self._started)
        elif completion_tokens > self._last_tokens:
            gap = (at - self._last_at) / (completion_tokens - self._last_tokens)
            for _ in range(completion_tokens - self._last_tokens):
                self._itl.observe(gap)
        self._last_at = at
        self._last_tokens = completion_tokens


def finished(model: str, version: str, tenant: str, outcome: str, prompt_tokens: int, completion_tokens: int) -> None:
    REQUESTS.labels(model, version, outcome).inc()
    if prompt_tokens:
        TOKENS.labels(model, tenant, "prompt").inc(prompt_tokens)
    if completion_tokens:
        TOKENS.labels(model, tenant, "completion").inc(completion_tokens)
