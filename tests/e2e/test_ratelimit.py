"""Rate limits through the real edge: request limits in Envoy, token budgets in the router, both on real Redis."""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import openai
import pytest

from meshserve.auth.v1 import auth_pb2
from meshserve.inference.v1 import inference_pb2
from meshserve.llm.v1 import llm_pb2
from meshserve.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc
from services.mesh.local import LocalMesh
from tests.e2e.helpers import (
    MODEL,
    QUESTION,
    bearer,
    create_key,
    edge_stub,
    engine_stub,
    openai_client,
    passed_by_failure_mode,
)

pytestmark = pytest.mark.mesh


def token_windows(mesh: LocalMesh, key: auth_pb2.Key) -> dict[str, int]:
    with mesh.channel("ratelimit", "router") as channel:
        who = ratelimit_pb2.Caller(
            tenant=key.tenant, key_id=key.key_id, key_tokens_per_minute=key.limits.tokens_per_minute
        )
        reply = ratelimit_pb2_grpc.TokenBudgetServiceStub(channel).GetBudget(
            ratelimit_pb2.GetBudgetRequest(caller=who), timeout=5
        )
    return {w.scope: w.used for w in reply.windows}


STORY = [{"role": "user", "content": "Write a very long story about a dragon who learns to cook."}]


def prompt_tokens(mesh: LocalMesh, messages: list[dict[str, str]] = QUESTION) -> int:
    channel, stub = engine_stub(mesh)
    with channel:
        turns = [inference_pb2.ChatTurn(role=m["role"], content=m["content"]) for m in messages]
        request = inference_pb2.CountTokensRequest(
            model=MODEL, input=inference_pb2.Input(conversation=inference_pb2.Conversation(turns=turns))
        )
        return stub.CountTokens(request, timeout=10).prompt_tokens


def test_64_clients_on_one_key_never_get_more_requests_than_its_limit(mesh: LocalMesh) -> None:
    _, secret = create_key(mesh, "hammer-requests")  # 40 requests per minute per key
    before = passed_by_failure_mode(mesh)

    def call(_: int) -> httpx.Response:
        return httpx.get(f"{mesh.edge_url}/v1/models", headers={"authorization": f"Bearer {secret}"}, timeout=30)

    with ThreadPoolExecutor(64) as pool:
        replies = list(pool.map(call, range(64 * 4)))
    statuses = [r.status_code for r in replies]
    # Every 200 the failure mode did not let through is a decision of the sliding window.
    opened = passed_by_failure_mode(mesh) - before
    assert statuses.count(200) + statuses.count(429) == 64 * 4
    assert statuses.count(200) <= 40 + opened, (statuses.count(200), opened)
    if opened:
        warnings.warn(f"{opened} of the 256 requests passed by the failure mode, not a decision", stacklevel=1)
    else:
        assert statuses.count(200) == 40
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert "40 requests per 60 s per key" in refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_64_clients_chatting_on_one_key_never_get_more_generations_than_its_request_limit(mesh: LocalMesh) -> None:
    # Generation's request limits are counted by the router's first reservation, not by the edge.
    _, secret = create_key(mesh, "hammer-requests")  # 40 requests per minute per key
    before = passed_by_failure_mode(mesh)
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 1}

    def call(_: int) -> httpx.Response:
        headers = {"authorization": f"Bearer {secret}"}
        return httpx.post(f"{mesh.edge_url}/v1/chat/completions", json=body, headers=headers, timeout=120)

    with ThreadPoolExecutor(64) as pool:
        replies = list(pool.map(call, range(128)))
    statuses = [r.status_code for r in replies]
    opened = passed_by_failure_mode(mesh) - before
    assert statuses.count(200) + statuses.count(429) == 128, statuses
    assert statuses.count(200) <= 40 + opened, (statuses.count(200), opened)
    if not opened:
        assert statuses.count(200) == 40
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert "40 requests per 60 s per key" in refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    # A request let through by the failure mode was not counted: it has no window to report.
    served = [r for r in replies if r.status_code == 200 and "x-ratelimit-limit-requests" in r.headers]
    assert len(served) >= statuses.count(200) - opened
    assert {r.headers["x-ratelimit-limit-requests"] for r in served} == {"40"}
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in served)[0] == 0


def test_the_sdk_gets_rate_limit_error_with_retry_after_and_may_go_on_after_it(mesh: LocalMesh) -> None:
    _, secret = create_key(mesh, "per-second")  # 2 requests per second per key
    client = openai_client(mesh, secret)
    first = client.models.with_raw_response.list()
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    client.models.list()
    with pytest.raises(openai.RateLimitError) as limited:
        client.models.list()
    retry_after = int(limited.value.response.headers["retry-after"])
    assert retry_after == 1
    time.sleep(retry_after)
    assert client.models.list().data


def test_a_keys_own_requests_per_minute_replaces_its_plans(mesh: LocalMesh) -> None:
    _, secret = create_key(mesh, "acme", rpm=3)
    client = openai_client(mesh, secret)
    for _ in range(3):
        client.models.list()
    with pytest.raises(openai.RateLimitError, match="3 requests per 60 s per key"):
        client.models.list()


def test_a_native_grpc_client_gets_resource_exhausted(mesh: LocalMesh) -> None:
    _, secret = create_key(mesh, "per-second")
    channel, stub = edge_stub(mesh)
    with channel:
        for _ in range(2):
            stub.ListModels(llm_pb2.ListModelsRequest(), metadata=bearer(secret), timeout=10)
        with pytest.raises(grpc.RpcError) as limited:
            stub.ListModels(llm_pb2.ListModelsRequest(), metadata=bearer(secret), timeout=10)
    assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_per_model_limits_read_the_model_from_rest_and_grpc_bodies(mesh: LocalMesh) -> None:
    _, secret = create_key(mesh, "per-model")  # 2 requests per minute per tenant and model
    client = openai_client(mesh, secret)
    for _ in range(2):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=1)
    with pytest.raises(openai.RateLimitError, match="per tenant_model"):
        client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=1)
    # Another model has its own count, and a header a client sends cannot move it there.
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="other-model", messages=QUESTION, max_tokens=1, extra_headers={"x-meshserve-model": "x"}
        )
    channel, stub = edge_stub(mesh)
    params = llm_pb2.ChatCompletionParams(
        model="grpc-model", messages=[llm_pb2.ChatMessage(role="user", content="hi")], max_tokens=1
    )
    codes = []
    with channel:
        for _ in range(3):
            try:
                stub.CreateChatCompletion(
                    llm_pb2.CreateChatCompletionRequest(params=params), metadata=bearer(secret), timeout=30
                )
            except grpc.RpcError as exc:
                codes.append(exc.code())
    assert codes == [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED]


def test_64_clients_never_get_more_tokens_than_the_budget_plus_one_reservation(mesh: LocalMesh) -> None:
    key, secret = create_key(mesh, "hammer-tokens")  # 600 tokens per minute per key
    client = openai_client(mesh, secret)
    max_tokens = 16
    reservation = prompt_tokens(mesh) + max_tokens

    def call(_: int) -> int | None:
        try:
            reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=max_tokens)
        except openai.RateLimitError:
            return None
        assert reply.usage is not None
        return reply.usage.total_tokens

    with ThreadPoolExecutor(64) as pool:
        used = list(pool.map(call, range(64)))
    served = [u for u in used if u is not None]
    assert served, "nothing was admitted"
    assert len(served) < 64, "nothing was refused"
    assert sum(served) <= 600 + reservation
    # Every settlement landed: the window holds exactly what the clients were told they used.
    deadline = time.monotonic() + 10
    while token_windows(mesh, key)["key"] != sum(served):
        assert time.monotonic() < deadline, (token_windows(mesh, key), sum(served))
        time.sleep(0.1)


def test_a_request_that_cannot_fit_is_refused_before_any_gpu_work(mesh: LocalMesh) -> None:
    key, secret = create_key(mesh, "acme", tpm=300)  # the key's own tokens-per-minute
    client = openai_client(mesh, secret)
    with pytest.raises(openai.RateLimitError, match="lower max_tokens"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1000)
    assert token_windows(mesh, key)["key"] == 0
    # A reservation of exactly the budget fits; whatever it really used, the same again cannot.
    max_tokens = 300 - prompt_tokens(mesh)
    client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=max_tokens)
    with pytest.raises(openai.RateLimitError, match="token limit reached") as limited:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=max_tokens)
    assert 1 <= int(limited.value.response.headers["retry-after"]) <= 60


def test_a_cancelled_stream_settles_to_the_tokens_actually_produced(mesh: LocalMesh) -> None:
    key, secret = create_key(mesh, "acme")
    prompt = prompt_tokens(mesh, STORY)
    stream = openai_client(mesh, secret).chat.completions.create(
        model=MODEL, messages=STORY, max_tokens=1000, stream=True, temperature=0
    )
    seen = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen += 1
        if seen == 3:
            break
    stream.close()
    # The reservation held 1000 completion tokens; after settling only what was produced counts.
    deadline = time.monotonic() + 10
    while (used := token_windows(mesh, key)["key"]) >= prompt + 1000:
        assert time.monotonic() < deadline, used
        time.sleep(0.1)
    assert prompt + seen <= used < prompt + 1000


def test_replies_carry_openais_token_limit_headers_whole_and_streamed(mesh: LocalMesh) -> None:
    _, secret = create_key(mesh, "token-headers", tpm=5000)
    headers = {"authorization": f"Bearer {secret}"}
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, "temperature": 0}
    whole = httpx.post(f"{mesh.edge_url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert whole.status_code == 200, whole.text
    assert whole.headers["x-ratelimit-limit-tokens"] == "5000"
    # What this request reserved (its prompt plus max_tokens) is out of the window.
    used = 5000 - int(whole.headers["x-ratelimit-remaining-tokens"])
    assert whole.json()["usage"]["prompt_tokens"] + 8 <= used
    assert whole.headers["x-ratelimit-reset-tokens"].endswith("s")
    assert int(whole.headers["x-ratelimit-remaining-requests"]) < int(whole.headers["x-ratelimit-limit-requests"])
    with httpx.stream(
        "POST", f"{mesh.edge_url}/v1/chat/completions", json={**body, "stream": True}, headers=headers, timeout=60
    ) as streamed:
        streamed.read()
    assert streamed.headers["x-ratelimit-limit-tokens"] == "5000"
    assert int(streamed.headers["x-ratelimit-remaining-tokens"]) < 5000 - used + 8
    assert streamed.headers["x-ratelimit-reset-requests"].endswith("s")
    assert "grpc-status" not in streamed.headers and "grpc-status" not in whole.headers
