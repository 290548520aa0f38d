"""The edge's HTTP filter chain: health, CORS, auth, the body's model and stream, limits, transcoding."""

from __future__ import annotations

import base64
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

from deploy.envoy.settings import BILLING_SERVICE, LLM_SERVICE, LUA, OPENAI_SERVICE, EdgeConfig
from meshserve.billing.v1 import billing_pb2
from meshserve.llm.v1 import llm_pb2
from meshserve.llm.v2 import llm_pb2 as llm_v2_pb2
from services.runtime.identity import KEY_ID_HEADER, KEY_RPM_HEADER, MODEL_HEADER, TENANT_HEADER
from services.runtime.openai_errors import ANTHROPIC_TYPES, ERROR_TYPE_HEADER, ERROR_TYPES


def transcoded_services(cfg: EdgeConfig) -> list[str]:
    return [OPENAI_SERVICE, LLM_SERVICE, *([BILLING_SERVICE] if cfg.billing is not None else [])]


def descriptor_set() -> bytes:
    """The FileDescriptorSet of the public API (chat and usage) and everything it imports."""
    seen: dict[str, FileDescriptor] = {}

    def visit(fd: FileDescriptor) -> None:
        if fd.name in seen:
            return
        for dep in fd.dependencies:
            visit(dep)
        seen[fd.name] = fd

    visit(llm_v2_pb2.DESCRIPTOR)
    visit(llm_pb2.DESCRIPTOR)
    visit(billing_pb2.DESCRIPTOR)
    out = descriptor_pb2.FileDescriptorSet()
    for fd in seen.values():
        fd.CopyToProto(out.file.add())
    return out.SerializeToString()


# Dynamic metadata namespace of the request body's fields the edge acts on (model, stream).
BODY_METADATA = "meshserve.body"


def lua_source() -> str:
    """The Lua filter with the error table filled in."""
    rows = ",\n".join(f'  [{status}] = {{"{kind}", "{code}"}}' for status, (kind, code) in ERROR_TYPES.items())
    anthropic = ",\n".join(f'  [{status}] = "{kind}"' for status, kind in ANTHROPIC_TYPES.items())
    source = LUA.read_text().replace("%%ERROR_TYPES%%", rows).replace("%%ANTHROPIC_TYPES%%", anthropic)
    source = source.replace("%%ERROR_TYPE_HEADER%%", ERROR_TYPE_HEADER)
    source = source.replace("%%MODEL_HEADER%%", MODEL_HEADER)
    source = source.replace("%%LLM_SERVICE%%", LLM_SERVICE).replace("%%OPENAI_SERVICE%%", OPENAI_SERVICE)
    return source.replace("%%BODY_METADATA%%", BODY_METADATA)


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


# Response headers a browser page may read: the request id and OpenAI's rate-limit headers.
EXPOSED_HEADERS = (
    "x-request-id",
    "retry-after",
    "x-meshserve-stopped",
    *(f"x-ratelimit-{what}-{kind}" for kind in ("requests", "tokens") for what in ("limit", "remaining", "reset")),
)


def cors_policy(cfg: EdgeConfig) -> dict[str, Any]:
    origins = [{"safe_regex": {"regex": ".*"}} if o == "*" else {"exact": o} for o in cfg.cors_origins]
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": origins,
        "allow_methods": "GET, POST, OPTIONS",
        "allow_headers": "*",
        "expose_headers": ", ".join(EXPOSED_HEADERS),
        "max_age": "86400",
        "allow_credentials": False,
    }


def http_filters(cfg: EdgeConfig) -> list[dict[str, Any]]:
    return [
        _health_check(),
        # Before auth: a browser's preflight carries no key, and the CORS filter answers it itself.
        {
            "name": "envoy.filters.http.cors",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"},
        },
        # Whole bodies up to the limit, refused (413; RESOURCE_EXHAUSTED to gRPC clients) beyond it by the
        # filter made for it, before auth: a body that overflowed while the auth check was pending stalled
        # until the client's deadline instead (Envoy stops reading; nothing was left to send the 413).
        {
            "name": "envoy.filters.http.buffer",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": cfg.max_request_bytes,
            },
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
