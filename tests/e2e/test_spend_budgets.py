"""Spend budgets through the whole mesh on real vLLM: a stream stopped at its key's budget, a whole reply cut
with a header, OpenAI's insufficient_quota after, and a ledger that never passes the budget."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import grpc
import httpx
import openai
import pytest
from google.api.httpbody_pb2 import HttpBody

from meshserve.auth.v1 import auth_pb2
from meshserve.llm.v2 import llm_pb2_grpc as llm_v2_grpc
from services.mesh.local import LocalMesh
from tests.e2e.helpers import MODEL, QUESTION, create_key, engine_load, openai_client
from tests.e2e.test_billing import ledger_line
from tests.e2e.test_cli_json import meshserve

pytestmark = pytest.mark.mesh

STORY = [{"role": "user", "content": "Write a very long story about a dragon."}]
# The mesh's price table: 0.0002 per 1,000 prompt tokens, 0.0006 per 1,000 completion tokens.
BUDGET = Decimal("0.0002")


def warm_up(client: openai.OpenAI, n: int = 8) -> tuple[int, int]:
    """Short replies, so the key's completion estimate is learned small; the tokens it was told."""
    prompt = completion = 0
    for _ in range(n):
        reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3, temperature=0)
        assert reply.usage is not None
        prompt, completion = prompt + reply.usage.prompt_tokens, completion + reply.usage.completion_tokens
    return prompt, completion


def sse_events(mesh: LocalMesh, secret: str, body: dict[str, object]) -> list[str]:
    with httpx.stream(
        "POST",
        f"{mesh.edge_url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {secret}"},
        timeout=120,
    ) as reply:
        assert reply.status_code == 200, reply.read()
        return [e for e in reply.read().decode().split("\n\n") if e]


def stopped_at_budget(mesh: LocalMesh) -> tuple[auth_pb2.Key, str, tuple[int, int], list[str]]:
    """A key of the tenant with a budget of its own, given a budget of BUDGET a day, warmed up (its estimate
    learned small), then a stream far longer than the budget pays for: the key, its secret, the tokens it was
    told of, and the stream's SSE events."""
    key, secret = create_key(mesh, "budgeted", budget=f"{BUDGET}/day")
    assert key.limits.budget == "0.0002/day"
    told = warm_up(openai_client(mesh, secret))
    events = sse_events(
        mesh,
        secret,
        {
            "model": MODEL,
            "messages": STORY,
            "max_tokens": 2000,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
            "temperature": 0,
        },
    )
    return key, secret, told, events


def test_a_stream_stops_at_the_budget_and_the_ledger_agrees(mesh: LocalMesh) -> None:
    key, secret, (told_prompt, told_completion), events = stopped_at_budget(mesh)
    client = openai_client(mesh, secret)
    assert events[-1] == "data: [DONE]"
    assert events[-2].startswith(": meshserve stopped this generation: its spend budget")
    chunks = [json.loads(e.removeprefix("data: ")) for e in events if e.startswith("data: {")]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and finishes.count("length") == 1
    usage = chunks[-1]["usage"]
    streamed = sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content"))
    assert 50 < usage["completion_tokens"] < 2000 and streamed <= usage["completion_tokens"]
    told_prompt += usage["prompt_tokens"]
    told_completion += usage["completion_tokens"]
    # The engine's generation was aborted: it would otherwise run on to 2,000 tokens for many seconds.
    deadline = time.monotonic() + 3
    while engine_load(mesh).running:
        assert time.monotonic() < deadline, "the engine still generates for a stream stopped at its budget"
        time.sleep(0.05)

    # Nothing is left for another request: OpenAI's insufficient_quota, through the SDK.
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=500, extra_body={"ignore_eos": True})
    assert refused.value.code == "insufficient_quota" and refused.value.type == "insufficient_quota"
    assert "this key's budget of 0.0002 per day" in refused.value.message

    line = ledger_line(mesh, key.key_id, 9)
    assert (line.requests, line.prompt_tokens, line.completion_tokens) == (9, told_prompt, told_completion)
    assert Decimal(line.cost) <= BUDGET

    # The key sees its budget beside its usage: spent, held by requests under way, and what is left.
    usage = httpx.get(f"{mesh.edge_url}/v1/usage", headers={"authorization": f"Bearer {secret}"}, timeout=30)
    [budget] = [b for b in usage.json()["budgets"] if b["subject"] == key.key_id]
    assert (budget["scope"], budget["period"][0], Decimal(budget["limit"])) == ("key", "d", BUDGET)
    assert Decimal(budget["held"]) == 0 and Decimal(line.cost) <= Decimal(budget["spent"]) <= BUDGET
    assert Decimal(budget["remaining"]) == BUDGET - Decimal(budget["spent"])
    # And the admin CLI shows the same.
    shown = meshserve(mesh, "usage", "--tenant", "budgeted", "--hours", "1")["budgets"]
    assert {**budget, "tenant": "budgeted"} in shown


def test_a_whole_reply_is_cut_at_the_budget_with_a_header(mesh: LocalMesh) -> None:
    key, secret = create_key(mesh, "budgeted", budget="0.0001/month")
    client = openai_client(mesh, secret)
    warm_up(client)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=STORY, max_tokens=1000, temperature=0, extra_body={"ignore_eos": True}
    )
    reply = raw.parse()
    assert raw.headers["x-meshserve-stopped"] == "spend-budget"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and 0 < reply.usage.completion_tokens < 1000
    line = ledger_line(mesh, key.key_id, 9)
    assert Decimal(line.cost) <= Decimal("0.0001")


def test_a_bad_budget_is_refused_when_the_key_is_created(mesh: LocalMesh) -> None:
    channel, stub, admin = mesh.admin_stub()
    with channel, pytest.raises(Exception, match="period must be one of"):
        stub.CreateKey(
            auth_pb2.CreateKeyRequest(tenant="budgeted", limits=auth_pb2.KeyLimits(budget="5/fortnight")),
            metadata=admin,
            timeout=10,
        )


def test_64_concurrent_clients_on_one_key_never_spend_past_its_budget(mesh: LocalMesh) -> None:
    budget = Decimal("0.0003")
    key, secret = create_key(mesh, "budgeted", budget=f"{budget}/day")
    client = openai_client(mesh, secret)
    told = list(warm_up(client))
    outcomes: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        body = {
            "model": MODEL,
            "messages": STORY,
            "max_tokens": 400,
            "ignore_eos": True,
            "temperature": 0,
        }
        headers = {"authorization": f"Bearer {secret}"}
        if i % 2:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            with httpx.stream(
                "POST", f"{mesh.edge_url}/v1/chat/completions", json=body, headers=headers, timeout=300
            ) as r:
                text = r.read().decode()
            if r.status_code == 429:
                assert json.loads(text)["error"]["type"] == "insufficient_quota"
                outcomes.append("refused")
                return
            events = [json.loads(e.removeprefix("data: ")) for e in text.split("\n\n") if e.startswith("data: {")]
            usage = events[-1]["usage"]
            stopped = ": meshserve stopped" in text
        else:
            r = httpx.post(f"{mesh.edge_url}/v1/chat/completions", json=body, headers=headers, timeout=300)
            if r.status_code == 429:
                assert r.json()["error"]["type"] == "insufficient_quota"
                outcomes.append("refused")
                return
            usage = r.json()["usage"]
            stopped = r.headers.get("x-meshserve-stopped") == "spend-budget"
        assert r.status_code == 200
        with lock:
            told[0] += usage["prompt_tokens"]
            told[1] += usage["completion_tokens"]
        outcomes.append("stopped" if stopped else "served")

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(one, range(64)))
    served = 8 + outcomes.count("served") + outcomes.count("stopped")
    line = ledger_line(mesh, key.key_id, served)
    assert (line.requests, line.prompt_tokens, line.completion_tokens) == (served, *told)
    assert Decimal(line.cost) <= budget
    assert outcomes.count("refused") + outcomes.count("stopped") > 0, outcomes


def test_a_key_budget_set_and_lifted_with_update_takes_effect_at_once(mesh: LocalMesh) -> None:
    key, secret = create_key(mesh, "budgeted")
    client = openai_client(mesh, secret)

    def update(budget: str) -> auth_pb2.Key:
        channel, stub, admin = mesh.admin_stub()
        with channel:
            limits = auth_pb2.KeyLimits(budget=budget)
            request = auth_pb2.UpdateKeyRequest(key_id=key.key_id, limits=limits)
            return stub.UpdateKey(request, metadata=admin, timeout=10).key

    def refused() -> bool:
        try:
            client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
        except openai.RateLimitError as exc:
            assert exc.code == "insufficient_quota"
            return True
        return False

    assert not refused()
    assert update("0.000001/day").limits.budget == "0.000001/day"
    deadline = time.monotonic() + 5
    while not refused():
        assert time.monotonic() < deadline, "the new budget never applied"
    assert update("").limits.budget == ""
    while refused():
        assert time.monotonic() < deadline + 5, "the lifted budget still applies"


def test_a_client_cannot_change_its_key_budget_with_a_header(mesh: LocalMesh) -> None:
    _, secret = create_key(mesh, "budgeted", budget="0.000001/day")
    for forged in ("1000/none", "none", ""):
        reply = httpx.post(
            f"{mesh.edge_url}/v1/chat/completions",
            json={"model": MODEL, "messages": QUESTION, "max_tokens": 2},
            headers={"authorization": f"Bearer {secret}", "x-meshserve-key-budget": forged},
            timeout=60,
        )
        assert reply.status_code == 429 and reply.json()["error"]["type"] == "insufficient_quota", reply.text


def test_two_routers_share_one_budget(mesh: LocalMesh) -> None:
    budget = "0.00005/day"  # about four short replies
    key, secret = create_key(mesh, "budgeted", budget=budget)
    second = mesh.start_router(name="router-budget")
    served = {"edge": 0, "router-budget": 0}
    refused = dict.fromkeys(served, 0)
    try:
        mesh.wait_serving(second, 60)
        body = json.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": 8, "temperature": 0}).encode()
        # Straight to the second router, with the key (the router checks generation's keys itself).
        identity = (("authorization", f"Bearer {secret}"),)
        with mesh.channel(second, "edge") as channel:
            stub = llm_v2_grpc.LlmServiceStub(channel)
            for i in range(16):
                if i % 2:
                    try:
                        stub.CreateChatCompletion(
                            HttpBody(content_type="application/json", data=body), metadata=identity, timeout=60
                        )
                        served["router-budget"] += 1
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                        assert ("x-meshserve-error-type", "insufficient_quota") in (exc.trailing_metadata() or ())
                        refused["router-budget"] += 1
                else:
                    reply = httpx.post(
                        f"{mesh.edge_url}/v1/chat/completions",
                        content=body,
                        headers={"authorization": f"Bearer {secret}", "content-type": "application/json"},
                        timeout=60,
                    )
                    assert reply.status_code in (200, 429), reply.text
                    served["edge"] += reply.status_code == 200
                    refused["edge"] += reply.status_code == 429
    finally:
        mesh.stop_proc(second)
    assert all(served.values()) and all(refused.values()), (served, refused)
    line = ledger_line(mesh, key.key_id, sum(served.values()))
    assert line.requests == sum(served.values()) and Decimal(line.cost) <= Decimal("0.00005")
