"""Prometheus metrics every service exports, and the /metrics endpoint."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

RPC_REQUESTS = Counter(
    "meshserve_rpc_requests_total",
    "gRPC calls handled, by service, method and status code.",
    ["service", "method", "code"],
)
RPC_DURATION = Histogram(
    "meshserve_rpc_duration_seconds",
    "Time from the start of a gRPC call to its end, streams included.",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


def observe_rpc(service: str, method: str, code: str, seconds: float) -> None:
    """Records one finished RPC."""
    RPC_REQUESTS.labels(service, method, code).inc()
    RPC_DURATION.labels(service, method).observe(seconds)


def serve_metrics(host: str, port: int) -> int:
    """Starts the /metrics HTTP endpoint in a thread; returns the bound port."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)
