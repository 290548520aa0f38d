"""What the edge config depends on: its addresses, limits and tracing, and the services it fronts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from meshserve.billing.v1 import billing_pb2
from meshserve.llm.v1 import llm_pb2
from meshserve.llm.v2 import llm_pb2 as llm_v2_pb2

LUA = Path(__file__).with_name("openai.lua")
LLM_SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name
# The OpenAI API (chat and completions, whole JSON bodies); v1 keeps the model list and its typed gRPC methods.
OPENAI_SERVICE = llm_v2_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name
BILLING_SERVICE = billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name
GENERATION_METHODS = (
    "CreateChatCompletion",
    "StreamChatCompletion",
    "CreateCompletion",
    "StreamCompletion",
    "CreateMessage",
    "StreamMessage",
    "CreateResponse",
    "StreamResponse",
    "CreateEmbedding",
)


def service_methods(full_name: str) -> list[str]:
    """The methods of one of the public API's gRPC services (meshserve.llm.v1 or v2), by its full name."""
    from google.protobuf import descriptor_pool

    return list(descriptor_pool.Default().FindServiceByName(full_name).methods_by_name)


def generation_rest_paths() -> list[str]:
    """The REST paths of the OpenAI API's generation methods (their google.api.http bindings)."""
    from google.api import annotations_pb2

    service = llm_v2_pb2.DESCRIPTOR.services_by_name["LlmService"]
    return [service.methods_by_name[m].GetOptions().Extensions[annotations_pb2.http].post for m in GENERATION_METHODS]


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
    # The router checks the API key of generation calls itself (its MESHSERVE_ROUTER_AUTH_REDIS_URL): the edge
    # skips ext_authz on generation's routes and passes the key on; every other route keeps the check.
    router_checks_keys: bool = False
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
    # Mutual TLS to every mesh service: the folder of the SDS files with the edge's certificate and the
    # mesh CA (mesh_tls.write_sds). None: plaintext upstreams (`meshserve up --no-mtls` only).
    mesh_sds: Path | None = None
    # TLS at the edge: the folder of the SDS files with the certificate clients see (mesh_tls.write_sds).
    # None: plain HTTP (locally by default, as `vllm serve`).
    edge_sds: Path | None = None
