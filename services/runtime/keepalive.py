"""HTTP/2 keepalive that every hop of the mesh agrees on.

Envoy and the router ping their upstreams every INTERVAL_SECONDS, so a dead peer is noticed within
INTERVAL_SECONDS + TIMEOUT_SECONDS even on an idle connection. A gRPC server counts pings closer
together than five minutes (or any ping while no call is open) as abuse, and after two such strikes
it answers GOAWAY "too_many_pings", which fails every call in flight on that connection with
UNAVAILABLE. Every server of the mesh therefore permits pings at half the interval its clients use.
"""

from __future__ import annotations

INTERVAL_SECONDS = 20.0
TIMEOUT_SECONDS = 5.0


def server_options(interval_seconds: float = INTERVAL_SECONDS) -> list[tuple[str, int]]:
    """grpc server options that accept clients pinging every interval_seconds, with or without calls."""
    return [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(interval_seconds * 1000 / 2)),
    ]


def channel_options(interval_seconds: float = INTERVAL_SECONDS) -> list[tuple[str, int]]:
    """grpc channel options that ping every interval_seconds while calls are open."""
    return [
        ("grpc.keepalive_time_ms", int(interval_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(TIMEOUT_SECONDS * 1000)),
    ]


def envoy_options(interval_seconds: float = INTERVAL_SECONDS) -> dict[str, str]:
    """Envoy's http2_protocol_options.connection_keepalive for an upstream gRPC cluster."""
    return {"interval": f"{interval_seconds:g}s", "timeout": f"{TIMEOUT_SECONDS:g}s"}
