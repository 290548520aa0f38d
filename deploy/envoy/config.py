"""Generates the Envoy edge config (YAML, via pyyaml) from the service addresses."""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

from meshserve.billing.v1 import billing_pb2
from meshserve.llm.v1 import llm_pb2
from services.auth.keys import ADMIN_PATH_PREFIX
from services.runtime import keepalive
from services.runtime.identity import KEY_ID_HEADER, KEY_RPM_HEADER, MODEL_HEADER, TENANT_HEADER
from services.runtime.openai_errors import ERROR_TYPES

LUA = Path(__file__).with_name("openai.lua")
LLM_SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name
BILLING_SERVICE = billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name
# The one billing method callers may reach through the edge (RecordUsage is the router's alone).
USAGE_PATH = f"/{BILLING_SERVICE}/GetUsage"


@dataclass(frozen=True)
class Address:
    """host:port of a listener or an upstream."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        host, _, port = text.rpartition(":")
        return cls(host or "127.0.0.1", int(port))


@dataclass(frozen=True)
class Tracing:
    """Where the edge sends its spans (an OTLP/gRPC collector) and how many requests it starts traces for."""

    collector: Address
    # Percent of requests without a sampled traceparent that the edge samples; the services follow its decision.
    sample_percent: float = 10.0


@dataclass(frozen=True)
class EdgeConfig:
    """What the edge config depends on."""

    listen: Address
    admin: Address
    router: Address
    # The auth service; None runs the edge without ext_authz (only for tests of the edge itself).
    auth: Address | None = None
    # The rate-limit service; None runs the edge without request limits.
    ratelimit: Address | None = None
    # The billing service, for usage queries (GET /v1/usage); None leaves them out of the edge.
    billing: Address | None = None
    # The rate-limit service unreachable (or failing closed on Redis): refuse with 503 instead of letting through.
    ratelimit_fail_closed: bool = False
    ratelimit_domain: str = "meshserve"
    # Largest request body the edge buffers (the Lua stream routing reads whole bodies).
    max_request_bytes: int = 16 * 1024 * 1024
    # A stream with no bytes either way for this long is reset.
    stream_idle_timeout_s: int = 300
    # Largest request header block (431 beyond it); below the backends' gRPC metadata limit (identity.METADATA_BYTES).
    max_request_headers_kb: int = 32
    # Time a client has to send its headers, and its whole request (slow-loris clients are cut off).
    request_headers_timeout_s: int = 10
    request_timeout_s: int = 60
    # Longest a whole (non-streamed) reply may take; streams are bounded by idleness instead.
    unary_timeout_s: int = 600
    # Connections the edge holds at once, over every listener; beyond it new ones are refused.
    max_connections: int = 10_000
    # Envoy's heap: at 95% it frees what it can, at 98% it stops taking new requests.
    max_heap_bytes: int = 1024 * 1024 * 1024
    # Origins browsers may call the API from (CORS); "*" allows any, as vLLM's server does. Never with
    # credentials: the API key is a header the page sends, not a cookie.
    cors_origins: tuple[str, ...] = ("*",)
    # OpenTelemetry tracing; None leaves it out (no tracer, no cost).
    tracing: Tracing | None = None


def transcoded_services(cfg: EdgeConfig) -> list[str]:
    return [LLM_SERVICE, *([BILLING_SERVICE] if cfg.billing is not None else [])]


def descriptor_set() -> bytes:
    """The FileDescriptorSet of the public API (chat and usage) and everything it imports."""
    seen: dict[str, FileDescriptor] = {}

    def visit(fd: FileDescriptor) -> None:
        if fd.name in seen:
            return
        for dep in fd.dependencies:
            visit(dep)
        seen[fd.name] = fd

    visit(llm_pb2.DESCRIPTOR)
    visit(billing_pb2.DESCRIPTOR)
    out = descriptor_pb2.FileDescriptorSet()
    for fd in seen.values():
        fd.CopyToProto(out.file.add())
    return out.SerializeToString()


def _socket(addr: Address) -> dict[str, Any]:
    return {"socket_address": {"address": addr.host, "port_value": addr.port}}


def _error_body(kind: str, code: str) -> dict[str, Any]:
    return {"json_format": {"error": {"message": "%LOCAL_REPLY_BODY%", "type": kind, "param": None, "code": code}}}


# Dynamic metadata namespace of the request body's fields the edge acts on (model, stream).
BODY_METADATA = "meshserve.body"


def lua_source() -> str:
    """The Lua filter with the error table filled in."""
    rows = ",\n".join(f'  [{status}] = {{"{kind}", "{code}"}}' for status, (kind, code) in ERROR_TYPES.items())
    source = LUA.read_text().replace("%%ERROR_TYPES%%", rows).replace("%%MODEL_HEADER%%", MODEL_HEADER)
    return source.replace("%%LLM_SERVICE%%", LLM_SERVICE).replace("%%BODY_METADATA%%", BODY_METADATA)


def _json_to_metadata() -> dict[str, Any]:
    """The body's top-level model and stream, parsed as JSON (escapes decoded, nested keys ignored)."""

    def rule(key: str, kind: str) -> dict[str, Any]:
        action = {"metadata_namespace": BODY_METADATA, "key": key, "type": kind}
        return {"selectors": [{"key": key}], "on_present": action}

    return {
        "name": "envoy.filters.http.json_to_metadata",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
            "request_rules": {
                "rules": [rule("model", "PROTOBUF_VALUE"), rule("stream", "PROTOBUF_VALUE")],
                # Other media types are refused by the Lua filter after it (415).
                "allow_content_types": ["application/json"],
                "allow_empty_content_type": True,
            },
        },
    }


def _grpc_local_status(cfg: EdgeConfig) -> dict[int, tuple[int, str]]:
    """gRPC status and message of the edge's own replies to native gRPC clients, where Envoy's default
    (from the HTTP status) would be UNKNOWN: a message or a header block over the edge's limit."""
    return {
        413: (8, f"the request is larger than the edge accepts ({cfg.max_request_bytes} bytes)"),
        431: (8, f"the request headers are larger than the edge accepts ({cfg.max_request_headers_kb} KiB)"),
    }


def _status_is(status: int) -> dict[str, Any]:
    value = {"default_value": status, "runtime_key": f"meshserve.local_reply.{status}"}
    return {"status_code_filter": {"comparison": {"op": "EQ", "value": value}}}


def _grpc_mappers(cfg: EdgeConfig) -> list[dict[str, Any]]:
    """gRPC clients get the message as plain text (it becomes grpc-message) and a status that says why."""
    is_grpc = {"header_filter": {"header": {"name": "content-type", "string_match": {"prefix": "application/grpc"}}}}
    plain = {"text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"}}

    def header(key: str, value: str) -> dict[str, Any]:
        return {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}

    # A trailers-only reply written whole: HTTP 200, the status and message as headers, no body.
    by_status = [
        {
            "filter": {"and_filter": {"filters": [is_grpc, _status_is(status)]}},
            "status_code": 200,
            "headers_to_add": [
                header("content-type", "application/grpc"),
                header("grpc-status", str(grpc)),
                header("grpc-message", message),
            ],
            "body_format_override": {"text_format_source": {"inline_string": ""}},
        }
        for status, (grpc, message) in _grpc_local_status(cfg).items()
    ]
    return [*by_status, {"filter": is_grpc, "body_format_override": plain}]


def _local_reply_config(cfg: EdgeConfig) -> dict[str, Any]:
    mappers = _grpc_mappers(cfg) + [
        {"filter": _status_is(status), "body_format_override": _error_body(kind, code)}
        for status, (kind, code) in ERROR_TYPES.items()
    ]
    return {"mappers": mappers, "body_format": _error_body("server_error", "internal_error")}


def _access_log() -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.access_loggers.stdout",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                "log_format": {
                    "json_format": {
                        "ts": "%START_TIME%",
                        "service": "edge",
                        "msg": "access",
                        "request_id": "%REQ(X-REQUEST-ID)%",
                        "trace_id": "%TRACE_ID%",
                        "method": "%REQ(:METHOD)%",
                        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
                        "protocol": "%PROTOCOL%",
                        "status": "%RESPONSE_CODE%",
                        "grpc_status": "%GRPC_STATUS%",
                        "model": f"%REQ({MODEL_HEADER})%",
                        "tenant": f"%REQ({TENANT_HEADER})%",
                        "duration_ms": "%DURATION%",
                        "upstream_ms": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
                        "bytes_in": "%BYTES_RECEIVED%",
                        "bytes_out": "%BYTES_SENT%",
                    }
                },
            },
        }
    ]


def _ext_authz() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "grpc_service": {"envoy_grpc": {"cluster_name": "auth"}, "timeout": "1s"},
            # Auth unreachable: refuse (503), never let requests through unchecked.
            "failure_mode_allow": False,
            "status_on_error": {"code": 503},
        },
    }


def _ratelimit(cfg: EdgeConfig) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            "domain": cfg.ratelimit_domain,
            "timeout": "0.5s",
            "failure_mode_deny": cfg.ratelimit_fail_closed,
            "status_on_error": {"code": 503},
            # gRPC clients get RESOURCE_EXHAUSTED, as from the router's token limits, not UNAVAILABLE.
            "rate_limited_as_resource_exhausted": True,
            "rate_limit_service": {
                "grpc_service": {"envoy_grpc": {"cluster_name": "ratelimit"}},
                "transport_api_version": "V3",
            },
        },
    }


def _header_entry(header: str, key: str) -> dict[str, Any]:
    return {"request_headers": {"header_name": header, "descriptor_key": key}}


def rate_limit_descriptors() -> list[dict[str, Any]]:
    """Per key, per tenant and per tenant+model, from the headers auth and the Lua filter set.

    A descriptor whose header is absent is not sent (e.g. no model on GET /v1/models).
    """
    tenant = _header_entry(TENANT_HEADER, "tenant")
    return [
        {"actions": [tenant, _header_entry(KEY_ID_HEADER, "key_id"), _header_entry(KEY_RPM_HEADER, "key_rpm")]},
        {"actions": [tenant]},
        {"actions": [tenant, _header_entry(MODEL_HEADER, "model")]},
    ]


# The public health endpoint for load balancers: no key, 200 only while a router serves.
HEALTH_PATH = "/health"


def _health_check() -> dict[str, Any]:
    """GET /health answered by the edge: 200 while at least one router passes its gRPC health check
    (SERVING: its models have replicas in rotation), 503 otherwise."""
    return {
        "name": "envoy.filters.http.health_check",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck",
            "pass_through_mode": False,
            "headers": [
                {"name": ":path", "string_match": {"exact": HEALTH_PATH}},
                {"name": ":method", "string_match": {"exact": "GET"}},
            ],
            "cluster_min_healthy_percentages": {"router": {"value": 1.0}},
        },
    }


def _cors_policy(cfg: EdgeConfig) -> dict[str, Any]:
    origins = [{"safe_regex": {"regex": ".*"}} if o == "*" else {"exact": o} for o in cfg.cors_origins]
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": origins,
        "allow_methods": "GET, POST, OPTIONS",
        "allow_headers": "*",
        "expose_headers": "x-request-id, retry-after, x-ratelimit-limit, x-ratelimit-remaining, x-ratelimit-reset",
        "max_age": "86400",
        "allow_credentials": False,
    }


def _http_filters(cfg: EdgeConfig) -> list[dict[str, Any]]:
    return [
        _health_check(),
        # Before auth: a browser's preflight carries no key, and the CORS filter answers it itself.
        {
            "name": "envoy.filters.http.cors",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"},
        },
        *([_ext_authz()] if cfg.auth is not None else []),
        _json_to_metadata(),
        # Before the rate-limit filter: it names the request's model in a header for per-model limits.
        {
            "name": "envoy.filters.http.lua",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": lua_source()},
            },
        },
        *([_ratelimit(cfg)] if cfg.ratelimit is not None else []),
        {
            "name": "envoy.filters.http.grpc_json_transcoder",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
                "proto_descriptor_bin": base64.b64encode(descriptor_set()).decode(),
                "services": transcoded_services(cfg),
                "print_options": {
                    "add_whitespace": False,
                    "always_print_primitive_fields": True,
                    "always_print_enums_as_ints": False,
                    "preserve_proto_field_names": True,
                    "stream_sse_style_delimited": True,
                },
                "convert_grpc_status": True,
                "request_validation_options": {"reject_unknown_method": True},
                # As OpenAI does (Azure-style clients send api-version); without it Envoy resets the call (503).
                "ignore_unknown_query_parameters": True,
            },
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        },
    ]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _grpc_cluster(name: str, addr: Address) -> dict[str, Any]:
    return {
        "name": name,
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


STREAMING_METHODS = ("StreamChatCompletion", "StreamCompletion")


def _llm_routes(cfg: EdgeConfig) -> list[dict[str, Any]]:
    """The API's routes, matched on the gRPC path the transcoder made (or the native client sent):
    streams last as long as generation does and are bounded by idleness; whole replies by a timeout."""
    limits = {"rate_limits": rate_limit_descriptors()} if cfg.ratelimit is not None else {}
    # A request that never reached a router (refused connection, a stream the router refused while
    # restarting) is tried again for about 2 s: a restarting router is not an error for its callers.
    retry = {
        "retry_on": "connect-failure,refused-stream,reset-before-request",
        "num_retries": 4,
        "retry_back_off": {"base_interval": "0.25s", "max_interval": "1s"},
    }
    idle = {"idle_timeout": f"{cfg.stream_idle_timeout_s}s", "retry_policy": retry}
    streams = [
        {"match": {"path": f"/{LLM_SERVICE}/{m}"}, "route": {"cluster": "router", "timeout": "0s", **idle, **limits}}
        for m in STREAMING_METHODS
    ]
    unary = {"cluster": "router", "timeout": f"{cfg.unary_timeout_s}s", **idle, **limits}
    return [*streams, {"match": {"prefix": "/"}, "route": unary}]


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
        "access_log": _access_log(),
        **({"tracing": _tracing(cfg.tracing)} if cfg.tracing is not None else {}),
        "local_reply_config": _local_reply_config(cfg),
        "route_config": {
            "name": "edge",
            "virtual_hosts": [
                {
                    "name": "meshserve",
                    "domains": ["*"],
                    "typed_per_filter_config": {"envoy.filters.http.cors": _cors_policy(cfg)},
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
        "http_filters": _http_filters(cfg),
    }
    return {
        "admin": {"address": _socket(cfg.admin)},
        "overload_manager": _overload_manager(cfg),
        "static_resources": {
            "listeners": [
                {
                    "name": "edge",
                    "address": _socket(cfg.listen),
                    "per_connection_buffer_limit_bytes": cfg.max_request_bytes,
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": [
                {
                    **_grpc_cluster("router", cfg.router),
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
                *([_grpc_cluster("auth", cfg.auth)] if cfg.auth is not None else []),
                *([_grpc_cluster("ratelimit", cfg.ratelimit)] if cfg.ratelimit is not None else []),
                *([_grpc_cluster("billing", cfg.billing)] if cfg.billing is not None else []),
                *([_grpc_cluster("otlp", cfg.tracing.collector)] if cfg.tracing is not None else []),
            ],
        },
    }


def write(cfg: EdgeConfig, path: Path) -> Path:
    """Writes the config as YAML to path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(render(cfg), sort_keys=False, width=120))
    return path
