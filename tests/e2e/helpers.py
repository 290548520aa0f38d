"""Clients the end-to-end tests use: the OpenAI SDK and gRPC stubs, pointed at the mesh."""

from __future__ import annotations

import socket
import ssl
import time
import urllib.request
from collections.abc import Callable

import grpc
from openai import OpenAI

from meshserve.auth.v1 import auth_pb2
from meshserve.billing.v1 import billing_pb2, billing_pb2_grpc
from meshserve.inference.v1 import inference_pb2, inference_pb2_grpc
from meshserve.llm.v1 import llm_pb2_grpc
from services.cli import top
from services.cli.top import Samples
from services.mesh.local import LocalMesh

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def openai_client(mesh: LocalMesh, api_key: str | None = None) -> OpenAI:
    """The official SDK on the edge, as the mesh's first user key unless told otherwise."""
    key = mesh.user_key if api_key is None else api_key
    return OpenAI(base_url=f"{mesh.edge_url}/v1", api_key=key, max_retries=0, timeout=120)


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


def edge_stub(mesh: LocalMesh) -> tuple[grpc.Channel, llm_pb2_grpc.LlmServiceStub]:
    channel = grpc.insecure_channel(f"{mesh.edge.host}:{mesh.edge.port}")
    return channel, llm_pb2_grpc.LlmServiceStub(channel)


def engine_stub(mesh: LocalMesh) -> tuple[grpc.Channel, inference_pb2_grpc.InferenceServiceStub]:
    channel = mesh.channel("inference", "router")
    return channel, inference_pb2_grpc.InferenceServiceStub(channel)


def engine_load(mesh: LocalMesh) -> inference_pb2.GetLoadResponse:
    channel, stub = engine_stub(mesh)
    with channel:
        return stub.GetLoad(inference_pb2.GetLoadRequest(), timeout=5)


def create_key(mesh: LocalMesh, tenant: str, tpm: int = 0, rpm: int = 0, budget: str = "") -> tuple[auth_pb2.Key, str]:
    """A new key of tenant through the admin API, with its own limits (and spend budget) if given."""
    channel, stub, admin = mesh.admin_stub()
    with channel:
        limits = auth_pb2.KeyLimits(tokens_per_minute=tpm, requests_per_minute=rpm, budget=budget)
        request = auth_pb2.CreateKeyRequest(tenant=tenant, limits=limits)
        reply = stub.CreateKey(request, metadata=admin, timeout=10)
    return reply.key, reply.secret


def scrape(mesh: LocalMesh, name: str) -> Samples:
    """Every sample of one service's /metrics, keyed by sample name and sorted labels."""
    samples = top.scrape(f"http://127.0.0.1:{mesh.procs[name].metrics_port}/metrics", timeout=5)
    assert samples is not None, f"{name} did not answer on /metrics"
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of name whose labels include labels."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def edge_counters(mesh: LocalMesh, prefix: str) -> dict[str, int]:
    """Envoy's counters whose names start with prefix, from its admin endpoint."""
    url = f"http://{mesh.admin.host}:{mesh.admin.port}/stats?usedonly&filter=^{prefix}"
    with urllib.request.urlopen(url, timeout=5) as r:
        lines = r.read().decode().splitlines()
    pairs = (line.split(": ", 1) for line in lines)
    return {name: int(v) for name, v in pairs if v.isdigit()}


# Envoy's rate-limit filter: the limiter did not answer in time (or failed) and the filter let the request by.
EDGE_FAILED_OPEN = "cluster.router.ratelimit.failure_mode_allowed"


def passed_by_failure_mode(mesh: LocalMesh) -> int:
    """Request checks the failure mode (open here) let through so far, not a decision of the window: the
    limiter's Redis call, or Envoy's or the router's call to the limiter, ran out of time."""
    # The limiter runs in the rate-limit service (the edge's checks) and in the router (generation's).
    limiters = sum(
        value(scrape(mesh, name), "meshserve_ratelimit_decisions_total", kind="requests", outcome="failed_open")
        for name in ("ratelimit", "router")
    )
    router = value(scrape(mesh, "router"), "meshserve_router_token_budget_unchecked_total")
    return int(limiters) + int(router) + edge_counters(mesh, EDGE_FAILED_OPEN).get(EDGE_FAILED_OPEN, 0)


def served_certificate(port: int, context: ssl.SSLContext, server_hostname: str) -> bytes:
    """The DER certificate a TLS server on 127.0.0.1:port presents in a new handshake."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls_socket:
            der = tls_socket.getpeercert(binary_form=True)
    assert der is not None
    return der


def usage_lines(
    mesh: LocalMesh, key_id: str, done: Callable[[list[billing_pb2.UsageLine]], bool]
) -> list[billing_pb2.UsageLine]:
    """A key's lines of billing's usage report, asked again (the ledger catches up within seconds) until done
    says they hold what is waited for, or 30 s have passed."""
    deadline = time.monotonic() + 30
    while True:
        with mesh.channel("billing", "admin") as channel:
            reply = billing_pb2_grpc.BillingServiceStub(channel).GetUsage(
                billing_pb2.GetUsageRequest(key_id=key_id), timeout=10
            )
        lines = list(reply.lines)
        if done(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.25)
