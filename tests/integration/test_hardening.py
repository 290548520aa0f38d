"""What one caller sends never hurts another: the defects of the hardening review, through the real edge.

The whole mesh (Redis, auth, rate limits, billing, router, Envoy) over a scripted replica, so each case
runs in milliseconds; the engine's own size check is in tests/e2e/test_hardening_engine.py.
"""

from __future__ import annotations

import json
import socket
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from google.api import httpbody_pb2

from meshserve.llm.v1 import llm_pb2, llm_pb2_grpc
from meshserve.llm.v2 import llm_pb2_grpc as llm_v2_pb2_grpc
from services.mesh.local import LocalMesh
from tests.e2e.helpers import create_key, passed_by_failure_mode, scrape, value
from tests.integration import scripted_inference
from tests.integration.bystanders import Bystanders

MODEL = "smollm2-135m-instruct"
RULES = Path(__file__).with_name("ratelimits-hardening.yaml")
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with scripted_inference.scripted_mesh(tmp_path_factory.mktemp("hardening"), RULES, 6, 0.1) as m:
        yield m


def post(mesh: LocalMesh, body: object, key: str | None = None, path: str = CHAT, **kw: object) -> httpx.Response:
    headers = {"authorization": f"Bearer {key or mesh.user_key}", **kw.pop("headers", {})}  # type: ignore[dict-item]
    content = body if isinstance(body, bytes | str) else json.dumps(body)
    return httpx.post(f"{mesh.edge_url}{path}", content=content, headers=headers, timeout=30, **kw)  # type: ignore[arg-type]


def chat_body(**extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **extra}


def ejections(mesh: LocalMesh) -> float:
    return value(scrape(mesh, "router"), "meshserve_router_ejections_total")


@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "frequency_penalty"])
def test_nan_is_a_400_naming_the_field_and_never_ejects_the_replica(mesh: LocalMesh, field: str) -> None:
    before = ejections(mesh)
    with Bystanders(mesh, 2):
        for raw in ("NaN", "Infinity", "-Infinity"):
            r = post(mesh, chat_body(**{field: raw}))
            assert r.status_code == 400, r.text
            assert r.json()["error"]["type"] == "invalid_request_error"
            assert field in r.json()["error"]["message"]
    assert ejections(mesh) == before


def test_nan_over_native_grpc_is_invalid_argument(mesh: LocalMesh) -> None:
    with grpc.insecure_channel(f"{mesh.edge.host}:{mesh.edge.port}") as channel:
        params = llm_pb2.ChatCompletionParams(
            model=MODEL, messages=[llm_pb2.ChatMessage(role="user", content="hi")], temperature=float("nan")
        )
        with pytest.raises(grpc.RpcError) as info:
            llm_pb2_grpc.LlmServiceStub(channel).CreateChatCompletion(
                llm_pb2.CreateChatCompletionRequest(params=params),
                metadata=(("authorization", f"Bearer {mesh.user_key}"),),
                timeout=10,
            )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in (info.value.details() or "")


def test_an_engine_fault_on_one_request_is_a_500_for_it_alone(mesh: LocalMesh) -> None:
    before = ejections(mesh)
    with Bystanders(mesh, 2):
        for _ in range(5):
            r = post(mesh, {"model": MODEL, "messages": [{"role": "user", "content": "bug"}]})
            assert r.status_code == 500, r.text
            assert r.json()["error"]["type"] == "server_error"
    assert ejections(mesh) == before


@pytest.mark.parametrize("where", ["model", "role"])
def test_a_huge_string_echoed_in_an_error_cuts_no_other_stream(mesh: LocalMesh, where: str) -> None:
    body = chat_body(model="m" * 100_000) if where == "model" else chat_body(messages=[{"role": "r" * 100_000}])
    with Bystanders(mesh, 8):
        for _ in range(3):
            r = post(mesh, body)
            assert r.status_code in (400, 404), r.text
            assert len(r.json()["error"]["message"]) < 2000


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", f"{CHAT}?api-version=2024-06-01"), ("GET", "/v1/models?x=1"), ("GET", "/v1/usage?x=1")],
)
def test_unknown_query_parameters_are_ignored(mesh: LocalMesh, method: str, path: str) -> None:
    headers = {"authorization": f"Bearer {mesh.user_key}"}
    body = json.dumps(chat_body()) if method == "POST" else None
    r = httpx.request(method, f"{mesh.edge_url}{path}", content=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text


def test_an_invalid_value_of_a_known_query_parameter_is_a_400(mesh: LocalMesh) -> None:
    r = httpx.get(
        f"{mesh.edge_url}/v1/usage?start=yesterday", headers={"authorization": f"Bearer {mesh.user_key}"}, timeout=30
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("tenant", "body"),
    [
        # The model JSON-escaped: a text pattern misses it, the transcoder decodes it.
        (
            "per-model-0",
            '{"model": "smollm2\\u002d135m-instruct", "messages": [{"role": "user", "content": "hi"}]}',
        ),
        # The same key twice: the edge's parser and the transcoder both take the last, the model served.
        (
            "per-model-3",
            '{"model": "x", "model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}]}',
        ),
        # A decoy "model" nested before the real one.
        (
            "per-model-1",
            '{"zz": {"model": "x"}, "model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}]}',
        ),
    ],
)
def test_the_tenant_model_limit_sees_the_model_the_router_serves(mesh: LocalMesh, tenant: str, body: str) -> None:
    _, key = create_key(mesh, tenant)  # 2 requests per minute per tenant and model
    codes = [post(mesh, body, key).status_code for _ in range(4)]
    assert codes == [200, 200, 429, 429]


def test_the_tenant_model_limit_sees_the_last_model_of_a_grpc_message(mesh: LocalMesh) -> None:
    _, key = create_key(mesh, "per-model-2")
    decoy = llm_pb2.CreateChatCompletionRequest(params=llm_pb2.ChatCompletionParams(model="x")).SerializeToString()
    real = llm_pb2.CreateChatCompletionRequest(
        params=llm_pb2.ChatCompletionParams(model=MODEL, messages=[llm_pb2.ChatMessage(role="user", content="hi")])
    ).SerializeToString()
    codes = []
    with grpc.insecure_channel(f"{mesh.edge.host}:{mesh.edge.port}") as channel:
        call = channel.unary_unary("/meshserve.llm.v1.LlmService/CreateChatCompletion")
        for _ in range(4):
            try:
                # Protobuf merges the two messages: the model served is the second's.
                call(decoy + real, metadata=(("authorization", f"Bearer {key}"),), timeout=10)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
    assert codes == ["OK", "OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]


@pytest.mark.parametrize(
    ("tenant", "body"),
    [
        # A decoy "model" nested before the real one, and the same key twice (the last one is served).
        (
            "per-model-4",
            '{"metadata": {"model": "x"}, "model": "x", "model": "smollm2-135m-instruct", "max_tokens": 2}',
        ),
        ("per-model-5", '{"model": "smollm2-135m-instruct", "tools": [{"model": "x"}], "max_tokens": 2}'),
    ],
)
def test_the_tenant_model_limit_sees_the_model_of_an_openai_grpc_body(mesh: LocalMesh, tenant: str, body: str) -> None:
    _, key = create_key(mesh, tenant)
    messages = ', "messages": [{"role": "user", "content": "hi"}]}'
    request = httpbody_pb2.HttpBody(content_type="application/json", data=(body[:-1] + messages).encode())
    codes = []
    with grpc.insecure_channel(f"{mesh.edge.host}:{mesh.edge.port}") as channel:
        stub = llm_v2_pb2_grpc.LlmServiceStub(channel)
        for _ in range(4):
            try:
                stub.CreateChatCompletion(request, metadata=(("authorization", f"Bearer {key}"),), timeout=10)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
    assert codes[2:] == ["RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"], codes


@pytest.mark.parametrize(
    "escaped",
    [
        b'{"model": "smollm2\\u002d135m-instruct", "messages": [{"role": "user", "content": "hi"}]}',
        b'{"mod\\u0065l": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}]}',
    ],
)
def test_an_openai_grpc_body_whose_model_the_edge_cannot_read_plainly_is_refused(
    mesh: LocalMesh, escaped: bytes
) -> None:
    with grpc.insecure_channel(f"{mesh.edge.host}:{mesh.edge.port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            llm_v2_pb2_grpc.LlmServiceStub(channel).CreateChatCompletion(
                httpbody_pb2.HttpBody(content_type="application/json", data=escaped),
                metadata=(("authorization", f"Bearer {mesh.user_key}"),),
                timeout=10,
            )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model" in (info.value.details() or "")


def test_a_header_too_large_is_a_431_the_sdk_does_not_retry(mesh: LocalMesh) -> None:
    r = post(mesh, chat_body(), headers={"x-meshserve-session": "s" * 40_000})
    assert r.status_code == 431, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff" * 64,
        llm_pb2.CreateChatCompletionRequest(params=llm_pb2.ChatCompletionParams(model=MODEL)).SerializeToString()[:-3],
        b"\x0a\x04\x0a\x02\xc3\x28",  # params.model with invalid UTF-8
        b"\x0a" * 3000,
    ],
)
def test_a_malformed_grpc_message_is_invalid_argument(mesh: LocalMesh, raw: bytes) -> None:
    with grpc.insecure_channel(f"{mesh.edge.host}:{mesh.edge.port}") as channel:
        call = channel.unary_unary("/meshserve.llm.v1.LlmService/CreateChatCompletion")
        with pytest.raises(grpc.RpcError) as info:
            call(raw, metadata=(("authorization", f"Bearer {mesh.user_key}"),), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()


def test_a_grpc_message_over_the_size_limit_is_resource_exhausted(mesh: LocalMesh) -> None:
    big = llm_pb2.CreateChatCompletionRequest(
        params=llm_pb2.ChatCompletionParams(
            model=MODEL, messages=[llm_pb2.ChatMessage(role="user", content="x" * (17 << 20))]
        )
    )
    for attempt in range(3):
        # A key the auth service has not cached: the body arrives while the check is pending (it stalled then).
        _, key = create_key(mesh, f"big-{attempt}")
        with grpc.insecure_channel(
            f"{mesh.edge.host}:{mesh.edge.port}", options=[("grpc.max_send_message_length", 64 << 20)]
        ) as channel:
            with pytest.raises(grpc.RpcError) as info:
                llm_pb2_grpc.LlmServiceStub(channel).CreateChatCompletion(
                    big, metadata=(("authorization", f"Bearer {key}"),), timeout=10
                )
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()


def test_a_grpc_timeout_header_on_rest_is_ignored(mesh: LocalMesh) -> None:
    r = post(mesh, chat_body(), headers={"grpc-timeout": "1n"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("stream", ["true", 1, {"a": 1}])
def test_stream_must_be_a_boolean(mesh: LocalMesh, stream: object) -> None:
    r = post(mesh, chat_body(stream=stream))
    assert r.status_code == 400, r.text
    assert "stream" in r.json()["error"]["message"]


def test_a_body_that_is_not_json_is_a_415(mesh: LocalMesh) -> None:
    r = post(mesh, chat_body(), headers={"content-type": "text/plain"})
    assert r.status_code == 415, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_a_client_that_never_finishes_its_headers_is_cut_off(mesh: LocalMesh) -> None:
    with socket.create_connection((mesh.edge.host, mesh.edge.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        data = s.recv(4096)
        waited = time.monotonic() - started
    assert waited < 20, f"held for {waited:.0f}s"
    assert data == b"" or b" 408 " in data.split(b"\r\n")[0]


def limiter_errors(mesh: LocalMesh) -> dict[str, float]:
    """The rate-limit service's failed Redis calls by error (sample labels: the error's class name)."""
    errors: dict[str, float] = {}
    for (name, labels), v in scrape(mesh, "ratelimit").items():
        if name == "meshserve_ratelimit_redis_errors_total":
            error = dict(labels)["error"]
            errors[error] = errors.get(error, 0) + v
    return errors


def test_64_clients_on_one_key_across_a_redis_restart_are_never_admitted_beyond_the_limit(mesh: LocalMesh) -> None:
    _, key = create_key(mesh, "hammer")  # 10 requests per minute per key

    def burst() -> list[int]:
        def call(_: int) -> int:
            headers = {"authorization": f"Bearer {key}"}
            return httpx.get(f"{mesh.edge_url}/v1/models", headers=headers, timeout=30).status_code

        with ThreadPoolExecutor(64) as pool:
            return list(pool.map(call, range(64)))

    before, errors_before = passed_by_failure_mode(mesh), limiter_errors(mesh)
    first = burst()  # opens many pooled connections from the limiter to Redis
    port = mesh.procs["redis"].grpc_port
    mesh.stop_proc(mesh.procs["redis"])  # SIGTERM: Redis writes its append-only file, the windows survive
    mesh.start_redis(port=port)
    second = burst()  # every pooled connection is stale now
    assert set(first + second) <= {200, 429}
    errors = {e: n - errors_before.get(e, 0) for e, n in limiter_errors(mesh).items()}
    # A stale connection is retried once on a fresh one: no decision fails for a broken connection.
    broken = {e: n for e, n in errors.items() if n and e != "TimeoutError"}
    assert not broken, f"decisions failed across the restart: {broken}"
    # A starved machine (CI's two cores) can still let a decision time out, and that fails open by design.
    opened = passed_by_failure_mode(mesh) - before
    assert first.count(200) + second.count(200) <= 10 + opened, (first.count(200), second.count(200), errors)
    if opened:
        warnings.warn(f"{opened} of 128 requests passed by the failure mode (timeouts {errors})", stacklevel=1)
    else:
        assert first.count(200) == 10 and second.count(200) == 0


def test_a_router_reports_serving_only_once_its_model_has_a_replica_in_rotation(mesh: LocalMesh) -> None:
    from services.mesh.local import free_port
    from services.runtime.server import check_health

    port = free_port()
    router = mesh.start_router("router-late", replicas=[f"127.0.0.1:{port}"])
    mesh.wait_bound(router, 30)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        target = f"127.0.0.1:{router.grpc_port}"
        assert not check_health(target, files=mesh.identity("admin"), peer="router"), "serving with no replica"
        time.sleep(0.2)
    replica = scripted_inference.start(mesh, "late", 2, 0.01, MESHSERVE_PORT=str(port))
    mesh.wait_serving(replica, 30)
    mesh.wait_serving(router, 30)
    mesh.stop_proc(router)
    mesh.stop_proc(replica)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_pipelined_http1_requests_are_all_answered(mesh: LocalMesh, method: str) -> None:
    body = json.dumps(chat_body()).encode()
    auth = f"Authorization: Bearer {mesh.user_key}\r\n"
    if method == "GET":
        one = f"GET /v1/models HTTP/1.1\r\nHost: edge\r\n{auth}\r\n".encode()
    else:
        head = f"POST {CHAT} HTTP/1.1\r\nHost: edge\r\n{auth}Content-Type: application/json\r\n"
        one = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    with socket.create_connection((mesh.edge.host, mesh.edge.port), timeout=10) as s:
        s.sendall(one * 3)
        data = b""
        deadline = time.monotonic() + 10
        while data.count(b"HTTP/1.1 200 OK") < 3 and time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 3, data[-500:]


@pytest.mark.parametrize("raw", [b"\x80", b'{"model": "\xff\xfe", "messages": []}', b'{"model": "\xed\xa0\x80"}'])
def test_invalid_utf8_is_a_400_whose_body_is_still_json(mesh: LocalMesh, raw: bytes) -> None:
    r = post(mesh, raw, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"  # the body decodes: it is valid UTF-8 JSON


@pytest.mark.parametrize(
    "value", ['"' + "x" * 70_000 + '"', '"' + "\\u00e9" * 20_000 + '"', '"' + '\\"' * 30_000 + '"']
)
def test_a_huge_bad_value_is_quoted_back_shortened(mesh: LocalMesh, value: str) -> None:
    r = post(mesh, '{"model": "' + MODEL + '", "prompt": "hi", "max_tokens": ' + value + "}", path="/v1/completions")
    assert r.status_code == 400, r.text[:300]
    assert "max_tokens" in r.json()["error"]["message"]  # the body is valid JSON, whatever was cut
    assert len(r.json()["error"]["message"]) < 1200
