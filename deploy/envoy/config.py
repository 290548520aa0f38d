"""Generates the Envoy edge config (YAML, via pyyaml) from the service addresses."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import yaml

from deploy.envoy.filters import cors_policy, http_filters, lua_source, rate_limit_descriptors
from deploy.envoy.mesh_tls import downstream_socket, upstream_socket
from deploy.envoy.replies import access_log, local_reply_config
from deploy.envoy.settings import (
    GENERATION_METHODS,
    LLM_SERVICE,
    OPENAI_SERVICE,
    USAGE_PATH,
    Address,
    EdgeConfig,
    Tracing,
    generation_rest_paths,
    service_methods,
)
from services.auth.keys import ADMIN_PATH_PREFIX
from services.runtime import keepalive
from services.runtime.identity import IDENTITY_HEADERS

__all__ = ["Address", "EdgeConfig", "Tracing", "lua_source", "render", "write"]


def _socket(addr: Address) -> dict[str, Any]:
    return {"socket_address": {"address": addr.host, "port_value": addr.port}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _grpc_cluster(name: str, addr: Address, mesh_sds: Path | None = None) -> dict[str, Any]:
    return {
        "name": name,
        **({"transport_socket": upstream_socket(name, mesh_sds)} if mesh_sds is not None else {}),
        # Kubernetes Service names resolve through DNS; local addresses are fixed.
        "type": "STATIC" if _is_ip(addr.host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {"connection_keepalive": keepalive.envoy_options()}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(addr)}}]}],
        },
    }


def _tracing(tracing: Tracing) -> dict[str, Any]:
    return {
        "random_sampling": {"value": tracing.sample_percent},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": "otlp"}, "timeout": "1s"},
                "service_name": "meshserve-edge",
            },
        },
    }


HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


STREAMING_METHODS = ("StreamChatCompletion", "StreamCompletion", "StreamMessage", "StreamResponse")


def _router_checks_keys() -> dict[str, Any]:
    """A generation route's own settings where the router checks API keys: no ext_authz (the key goes on to the
    router), and no identity headers from the client (the router never reads them on these calls; dropped so no
    one downstream can)."""
    return {
        "typed_per_filter_config": {
            "envoy.filters.http.ext_authz": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                "disabled": True,
            }
        },
        "request_headers_to_remove": list(IDENTITY_HEADERS),
    }


def _llm_routes(cfg: EdgeConfig) -> list[dict[str, Any]]:
    """The API's routes, matched on the gRPC path the transcoder made (or the native client sent):
    streams last as long as generation does and are bounded by idleness; whole replies by a timeout.

    Request limits: checked here (the rate-limit service's RateLimitService) on every route but generation;
    a generation's are checked by the router's first reservation, which also holds its tokens (one call to
    the rate-limit service on the way to the first token instead of two). The rate-limit filter runs before
    the transcoder, on the route of the REST path; the router filter on the route of the gRPC path."""
    limits = {"rate_limits": rate_limit_descriptors()} if cfg.ratelimit is not None else {}
    # A request that never reached a router (refused connection, a stream the router refused while
    # restarting) is tried again for about 2 s: a restarting router is not an error for its callers.
    retry = {
        "retry_on": "connect-failure,refused-stream,reset-before-request",
        "num_retries": 4,
        "retry_back_off": {"base_interval": "0.25s", "max_interval": "1s"},
    }
    idle = {"idle_timeout": f"{cfg.stream_idle_timeout_s}s", "retry_policy": retry}
    checked = _router_checks_keys() if cfg.auth is not None and cfg.router_checks_keys else {}
    served = [(service, m) for service in (OPENAI_SERVICE, LLM_SERVICE) for m in service_methods(service)]
    streams = [
        {"match": {"path": f"/{service}/{m}"}, "route": {"cluster": "router", "timeout": "0s", **idle}, **checked}
        for service, m in served
        if m in STREAMING_METHODS
    ]
    unary = {"cluster": "router", "timeout": f"{cfg.unary_timeout_s}s", **idle}
    generation = [
        {"match": {"path": f"/{service}/{m}"}, "route": unary, **checked}
        for service, m in served
        if m in GENERATION_METHODS and m not in STREAMING_METHODS
    ]
    generation += [{"match": {"path": path}, "route": unary, **checked} for path in generation_rest_paths()]
    return [*streams, *generation, {"match": {"prefix": "/"}, "route": {**unary, **limits}}]


def _overload_manager(cfg: EdgeConfig) -> dict[str, Any]:
    """Envoy's own protection: a bound on connections and on its heap (the edge best practices)."""
    heap = "envoy.resource_monitors.fixed_heap"

    def action(name: str, threshold: float) -> dict[str, Any]:
        return {"name": name, "triggers": [{"name": heap, "threshold": {"value": threshold}}]}

    return {
        "refresh_interval": "0.25s",
        "resource_monitors": [
            {
                "name": heap,
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                    "max_heap_size_bytes": cfg.max_heap_bytes,
                },
            },
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3"
                    ".DownstreamConnectionsConfig",
                    "max_active_downstream_connections": cfg.max_connections,
                },
            },
        ],
        "actions": [
            action("envoy.overload_actions.shrink_heap", 0.95),
            action("envoy.overload_actions.stop_accepting_requests", 0.98),
        ],
    }


def render(cfg: EdgeConfig) -> dict[str, Any]:
    """The whole Envoy bootstrap as a dict."""
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "edge",
        "codec_type": "AUTO",
        "generate_request_id": True,
        # Every response says its request id: the client's own x-request-id if it sent one.
        "preserve_external_request_id": True,
        "always_set_request_id_in_response": True,
        "use_remote_address": True,
        "stream_idle_timeout": f"{cfg.stream_idle_timeout_s}s",
        "request_headers_timeout": f"{cfg.request_headers_timeout_s}s",
        "request_timeout": f"{cfg.request_timeout_s}s",
        "max_request_headers_kb": cfg.max_request_headers_kb,
        "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
        # Envoy's default windows stay: requests are buffered whole (the Lua filter reads gRPC bodies), and
        # a 64 KiB stream window stalls a buffered upload at its first window.
        "http2_protocol_options": {"max_concurrent_streams": 100},
        "access_log": access_log(),
        **({"tracing": _tracing(cfg.tracing)} if cfg.tracing is not None else {}),
        "local_reply_config": local_reply_config(cfg),
        "route_config": {
            "name": "edge",
            "virtual_hosts": [
                {
                    "name": "meshserve",
                    "domains": ["*"],
                    "typed_per_filter_config": {"envoy.filters.http.cors": cors_policy(cfg)},
                    "routes": [
                        *(
                            [{"match": {"prefix": ADMIN_PATH_PREFIX}, "route": {"cluster": "auth", "timeout": "10s"}}]
                            if cfg.auth is not None
                            else []
                        ),
                        # Matched after the transcoder has turned GET /v1/usage into this gRPC path.
                        *(
                            [{"match": {"path": USAGE_PATH}, "route": {"cluster": "billing", "timeout": "30s"}}]
                            if cfg.billing is not None
                            else []
                        ),
                        *_llm_routes(cfg),
                    ],
                }
            ],
        },
        "http_filters": http_filters(cfg),
    }
    return {
        # Who this Envoy is (SDS, used for the mesh certificates, requires it).
        "node": {"id": "edge", "cluster": "meshserve-edge"},
        "admin": {"address": _socket(cfg.admin)},
        "overload_manager": _overload_manager(cfg),
        "static_resources": {
            "listeners": [
                {
                    "name": "edge",
                    "address": _socket(cfg.listen),
                    "per_connection_buffer_limit_bytes": cfg.max_request_bytes,
                    "filter_chains": [
                        {
                            **({"transport_socket": downstream_socket(cfg.edge_sds)} if cfg.edge_sds else {}),
                            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    **_grpc_cluster("router", cfg.router, cfg.mesh_sds),
                    # /health and the choice among routers: the gRPC health of each (SERVING once its
                    # models have replicas in rotation). With every router failing, Envoy's panic mode
                    # still sends to all of them, so a single router's restart costs no extra time.
                    "health_checks": [
                        {
                            "timeout": "1s",
                            "interval": "1s",
                            # Also before any request was routed (Envoy's default then is once a minute).
                            "no_traffic_interval": "1s",
                            "unhealthy_threshold": 2,
                            "healthy_threshold": 1,
                            "grpc_health_check": {},
                        }
                    ],
                    # Envoy allows 3 retries in flight per cluster by default: while a router restarts,
                    # every waiting caller retries at once, and the rest would get 503s.
                    "circuit_breakers": {"thresholds": [{"max_retries": 1024}]},
                },
                *([_grpc_cluster("auth", cfg.auth, cfg.mesh_sds)] if cfg.auth is not None else []),
                *([_grpc_cluster("ratelimit", cfg.ratelimit, cfg.mesh_sds)] if cfg.ratelimit is not None else []),
                *([_grpc_cluster("billing", cfg.billing, cfg.mesh_sds)] if cfg.billing is not None else []),
                # The collector is not a mesh service: plaintext OTLP, as collectors listen by default.
                *([_grpc_cluster("otlp", cfg.tracing.collector)] if cfg.tracing is not None else []),
            ],
        },
    }


def write(cfg: EdgeConfig, path: Path) -> Path:
    """Writes the config as YAML to path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(render(cfg), sort_keys=False, width=120))
    return path
