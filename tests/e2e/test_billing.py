"""Billing through the whole mesh on real vLLM: the ledger equals what clients were told and what the engine made."""

from __future__ import annotations

import time
import urllib.request

import grpc
import httpx
import pytest

from meshserve.billing.v1 import billing_pb2, billing_pb2_grpc
from services.inference.metrics import GENERATED
from services.mesh.local import LocalMesh
from tests.e2e.helpers import MODEL, QUESTION, bearer, create_key, openai_client

pytestmark = pytest.mark.mesh


def engine_generated(mesh: LocalMesh) -> float:
    url = f"http://127.0.0.1:{mesh.procs['inference'].metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        body = r.read().decode()
    [line] = [ln for ln in body.splitlines() if ln.startswith(f"{GENERATED}_total{{")]
    return float(line.rsplit(" ", 1)[1])


def ledger_line(mesh: LocalMesh, key_id: str, requests: int, timeout: float = 30) -> billing_pb2.UsageLine:
    deadline = time.monotonic() + timeout
    while True:
        with mesh.channel("billing", "admin") as channel:
            reply = billing_pb2_grpc.BillingServiceStub(channel).GetUsage(
                billing_pb2.GetUsageRequest(key_id=key_id), timeout=10
            )
        if (reply.lines and reply.lines[0].requests >= requests) or time.monotonic() > deadline:
            return reply.lines[0] if reply.lines else billing_pb2.UsageLine()
        time.sleep(0.25)


def test_mixed_requests_are_billed_token_for_token(mesh: LocalMesh) -> None:
    key, secret = create_key(mesh, "billed")
    client = openai_client(mesh, secret)
    generated_before = engine_generated(mesh)
    told_prompt = told_completion = 0
    for i in range(2):
        reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8 + i, temperature=0)
        assert reply.usage is not None
        told_prompt += reply.usage.prompt_tokens
        told_completion += reply.usage.completion_tokens
    stream = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    usage = [c.usage for c in stream if c.usage][-1]
    told_prompt += usage.prompt_tokens
    told_completion += usage.completion_tokens
    text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6)
    assert text.usage is not None
    told_prompt += text.usage.prompt_tokens
    told_completion += text.usage.completion_tokens

    line = ledger_line(mesh, key.key_id, 4)
    assert (line.tenant, line.model, line.requests) == ("billed", MODEL, 4)
    assert (line.prompt_tokens, line.completion_tokens) == (told_prompt, told_completion)
    # Everything the engine generated meanwhile is on the ledger, and nothing else.
    wait_for_engine(mesh, generated_before + told_completion)

    # A client that leaves mid-stream is billed for what the engine generated before the abort.
    leaving = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a very long story about a dragon."}],
        max_tokens=200,
        stream=True,
    )
    for n, _ in enumerate(leaving):
        if n == 3:
            break
    leaving.close()
    line = ledger_line(mesh, key.key_id, 5)
    assert line.requests == 5
    cancelled_tokens = line.completion_tokens - told_completion
    assert 3 <= cancelled_tokens < 200
    # The router bills the tokens it received before it aborted the request; the engine may have made
    # a few more in the meantime, which is the drift the billing metrics show.
    generated = engine_generated(mesh) - generated_before
    assert line.completion_tokens <= generated <= line.completion_tokens + 8


def wait_for_engine(mesh: LocalMesh, total: float) -> None:
    deadline = time.monotonic() + 10
    while engine_generated(mesh) != total:
        assert time.monotonic() < deadline, (engine_generated(mesh), total)
        time.sleep(0.25)


def test_usage_through_the_edge_is_scoped_to_the_callers_tenant(mesh: LocalMesh) -> None:
    keys = {tenant: create_key(mesh, tenant) for tenant in ("usage-a", "usage-b")}
    for key, secret in keys.values():
        openai_client(mesh, secret).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
        assert ledger_line(mesh, key.key_id, 1).requests == 1
    url = f"{mesh.edge_url}/v1/usage"
    a_secret = keys["usage-a"][1]
    since = {"start": time.strftime("%Y-%m-%dT00:00:00Z", time.gmtime(time.time() - 86400))}

    own = httpx.get(url, params=since, headers={"authorization": f"Bearer {a_secret}"}, timeout=30)
    assert own.status_code == 200, own.text
    [line] = own.json()["lines"]
    assert (line["tenant"], line["key_id"], line["requests"]) == ("usage-a", keys["usage-a"][0].key_id, "1")
    assert own.json()["currency"] == "USD"

    other = httpx.get(url, params={"tenant": "usage-b"}, headers={"authorization": f"Bearer {a_secret}"}, timeout=30)
    assert other.status_code == 403
    assert other.json()["error"]["type"] == "permission_error"
    assert httpx.get(url, timeout=30).status_code == 401

    admin = {"authorization": f"Bearer {mesh.admin_key}"}
    everyone = httpx.get(url, params=since, headers=admin, timeout=30).json()
    assert {"usage-a", "usage-b"} <= {line["tenant"] for line in everyone["lines"]}

    # The same over native gRPC through the edge; recording stays the router's alone.
    with grpc.insecure_channel(f"{mesh.edge.host}:{mesh.edge.port}") as channel:
        stub = billing_pb2_grpc.BillingServiceStub(channel)
        reply = stub.GetUsage(billing_pb2.GetUsageRequest(), metadata=bearer(keys["usage-b"][1]), timeout=30)
        assert {line.tenant for line in reply.lines} == {"usage-b"}
        with pytest.raises(grpc.RpcError) as refused:
            stub.RecordUsage(iter([billing_pb2.RecordUsageRequest()]), metadata=bearer(a_secret), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
