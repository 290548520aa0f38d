"""Fuzzing the real edge: what any caller sends is a clear 4xx for that caller, and nobody else notices.

The whole mesh (Envoy, auth, rate limits, billing, router) over a scripted replica. Hypothesis mutates
valid OpenAI bodies (wrong types, extremes, NaN and Infinity, huge strings and arrays, deep nesting,
unknown fields), sends raw bytes (invalid UTF-8, truncated JSON) with odd content types, methods, paths
and query parameters, and native gRPC messages (random and truncated bytes). Properties: never a 5xx
but a deliberate 503 with Retry-After; every REST error OpenAI-shaped with the type its status has;
every gRPC error a status that says why, never UNKNOWN or INTERNAL; no hang; another tenant's streams,
running throughout, finish whole; every process alive at the end.

MESHSERVE_FUZZ_EXAMPLES sets the cases per property (CI runs a bounded slice); MESHSERVE_FUZZ_REPORT
names a file for a report of what was tried (`make fuzz` runs 10,000 cases and writes bench/reports/).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshserve.llm.v1 import llm_pb2
from services.mesh.local import LocalMesh
from services.runtime.openai_errors import ANTHROPIC_TYPES, ERROR_TYPES
from tests.integration import scripted_inference
from tests.integration.bystanders import Bystanders

MODEL = "smollm2-135m-instruct"
RULES = Path(__file__).with_name("ratelimits-hardening.yaml")
EXAMPLES = int(os.environ.get("MESHSERVE_FUZZ_EXAMPLES", "120"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
# What was sent and what came back, per property, for the report.
SEEN: dict[str, Counter[str]] = {}


class Fuzzed:
    """The mesh under fuzzing, with another tenant's streams running the whole time."""

    def __init__(self, mesh: LocalMesh) -> None:
        self.mesh = mesh
        self.headers = {"authorization": f"Bearer {mesh.user_key}"}
        self.bystanders = Bystanders(mesh, 4)
        self.http = httpx.Client(base_url=mesh.edge_url, timeout=30)
        self.channel = grpc.insecure_channel(f"{mesh.edge.host}:{mesh.edge.port}")


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    started = time.monotonic()
    with scripted_inference.scripted_mesh(tmp_path_factory.mktemp("fuzz"), RULES, 3, 0.05) as mesh:
        f = Fuzzed(mesh)
        with f.bystanders:
            yield f
        f.http.close()
        f.channel.close()
        dead = [p.name for p in mesh.procs.values() if not p.alive()]
        assert dead == [], f"processes died while fuzzing: {dead}"
        _report(f.bystanders.results, time.monotonic() - started)


def _report(bystanders: list[str], seconds: float) -> None:
    target = os.environ.get("MESHSERVE_FUZZ_REPORT")
    if not target:
        return
    lines = [
        "# Fuzzing the edge",
        "",
        f"{EXAMPLES} cases per property, {seconds:.0f} s in all, on a scripted replica; "
        f"another tenant's streams completed whole: {bystanders.count('ok')} of {len(bystanders)}.",
        "",
        "| property | cases | outcomes |",
        "|---|---|---|",
    ]
    for name, outcomes in sorted(SEEN.items()):
        shown = ", ".join(f"{k}: {v}" for k, v in outcomes.most_common())
        lines.append(f"| {name} | {sum(outcomes.values())} | {shown} |")
    Path(target).write_text("\n".join(lines) + "\n")


def _seen(prop: str, outcome: object) -> None:
    SEEN.setdefault(prop, Counter())[str(outcome)] += 1


# JSON values of every shape, including the ones parsers and range checks trip on.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 2**31, 2**32, 2**63, 2**64, 1e39, -1e39, 1e-320]),
    st.text(max_size=50),
    st.sampled_from(["", "NaN", "Infinity", "-Infinity", "true", "null", "\u0000", "\ud7ff", "x" * 70_000]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
FIELDS = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "response_format",
    "logit_bias",
    "user",
    "echo",
    "suffix",
    "best_of",
    "input",
    "instructions",
    "max_output_tokens",
    "previous_response_id",
    "text",
    "store",
]


DEEP = "__deep__"


@st.composite
def mutated_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid chat or completion body with some fields replaced, removed or added, as the bytes sent
    (deep nesting is spliced into the text: no Python structure, and no printout of one, goes that deep)."""
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/responses"]))
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 4}
    if path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "hi"}]
    elif path == "/v1/responses":  # the Responses API's own fields, mutated as the others' are
        body = {"model": MODEL, "max_output_tokens": 4, "input": "hi"}
    else:
        body["prompt"] = "hi"
    for _ in range(draw(st.integers(1, 4))):
        field = draw(st.sampled_from([*FIELDS, "unknown_field", "messages.0.role", "messages.0.content"]))
        action = draw(st.sampled_from(["set", "delete", "deep", "huge_list"]))
        messages = body.get("messages")
        if (
            field.startswith("messages.0.")
            and isinstance(messages, list)
            and messages
            and isinstance(messages[0], dict)
        ):
            target, key = messages[0], field.rsplit(".", 1)[1]
        else:
            target, key = body, field.split(".")[0]
        if action == "delete":
            target.pop(key, None)
        elif action == "deep":
            target[key] = DEEP
        elif action == "huge_list":
            # Many small items (huge strings come as single values): megabytes, not gigabytes, of JSON.
            item = draw(st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=8), st.none()))
            target[key] = [item] * draw(st.integers(1000, 20_000))
        else:
            target[key] = draw(VALUES)
    if draw(st.booleans()):
        body["stream"] = draw(st.sampled_from([True, False]))
    depth = draw(st.integers(50, 3000))
    raw = json.dumps(body, allow_nan=True).replace(f'"{DEEP}"', "[" * depth + '"x"' + "]" * depth)
    return path, raw.encode()


def _check_rest(prop: str, r: httpx.Response) -> None:
    """A clear answer: never a 5xx but a 503 to retry, and an error in the route's own shape (OpenAI's, or
    Anthropic's on /v1/messages)."""
    _seen(prop, r.status_code)
    assert r.status_code < 500 or (r.status_code == 503 and "retry-after" in r.headers), (
        f"{r.status_code}: {r.text[:300]}"
    )
    assert not [h for h in r.headers if h.startswith("grpc-")], dict(r.headers)
    if r.status_code >= 400 and r.url.path.startswith("/v1/messages"):
        body = r.json()
        assert body["type"] == "error" and isinstance(body["error"]["message"], str), body
        assert body["error"]["type"] == ANTHROPIC_TYPES.get(r.status_code, body["error"]["type"]), body
    elif r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert len(error["message"]) <= 4096
        if r.status_code in ERROR_TYPES:
            assert error["type"] == ERROR_TYPES[r.status_code][0], (r.status_code, error)
    elif r.headers.get("content-type", "").startswith("application/json"):
        r.json()


def _send(f: Fuzzed, method: str, path: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
    return f.http.request(method, path, content=content, headers={**f.headers, **headers})


@FUZZ
@given(case=mutated_bodies())
def test_mutated_openai_bodies_get_a_clear_answer(fuzzed: Fuzzed, case: tuple[str, bytes]) -> None:
    path, raw = case
    _check_rest("mutated JSON bodies", _send(fuzzed, "POST", path, raw, {"content-type": "application/json"}))


RAW_BODIES = st.one_of(
    st.binary(max_size=2000),
    st.sampled_from(
        [
            b"",
            b"{",
            b'{"model": "smollm2-135m-instruct", "messages": [',
            b'{"model": "\xff\xfe", "messages": []}',
            b"[1, 2, 3]",
            b'"just a string"',
            b"null",
            b'{"model": "smollm2-135m-instruct", "model": "x", "messages": [{"role": "user", "content": "hi"}]}',
            b'{"stream": true, "stream": "yes"}',
        ]
    ),
)


@FUZZ
@given(
    method=st.sampled_from(["POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    path=st.sampled_from(
        [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/models",
            "/v1/usage",
            "/v1/chat/completions:stream",
            "/v1/messages",
            "/v1/messages:stream",
            "/v1/responses",
            "/v1/responses/resp_unknown",
            "/v1/nothing",
            "/",
            "/meshserve.llm.v1.LlmService/CreateChatCompletion",
        ]
    ),
    query=st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=20), max_size=3),
    content_type=st.sampled_from(
        ["application/json", "application/json; charset=utf-8", "text/plain", "", "application/x-www-form-urlencoded"]
    ),
    raw=RAW_BODIES,
)
def test_raw_requests_of_any_shape_get_a_clear_answer(
    fuzzed: Fuzzed, method: str, path: str, query: dict[str, str], content_type: str, raw: bytes
) -> None:
    r = fuzzed.http.request(
        method,
        path,
        params=query,
        content=raw if method not in ("GET", "HEAD") else None,
        headers={**fuzzed.headers, **({"content-type": content_type} if content_type else {})},
    )
    if method == "HEAD":
        _seen("raw requests", r.status_code)
        assert r.status_code < 500
        return
    _check_rest("raw requests", r)


GRPC_METHODS = ["CreateChatCompletion", "StreamChatCompletion", "CreateCompletion", "StreamCompletion", "ListModels"]
VALID = llm_pb2.CreateChatCompletionRequest(
    params=llm_pb2.ChatCompletionParams(model=MODEL, messages=[llm_pb2.ChatMessage(role="user", content="hi")])
).SerializeToString()
# Codes a caller's bad message may get; UNKNOWN and INTERNAL mean the mesh did not understand its own error.
CALLER_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.OUT_OF_RANGE,
}


@FUZZ
@given(
    method=st.sampled_from(GRPC_METHODS),
    raw=st.one_of(
        st.binary(max_size=4000),
        st.integers(0, len(VALID)).map(lambda n: VALID[:n]),
        st.binary(min_size=1, max_size=50).map(lambda b: VALID + b),
        st.integers(1, 5000).map(lambda n: b"\x0a" * n),
    ),
)
def test_native_grpc_messages_of_any_bytes_get_a_status_that_says_why(fuzzed: Fuzzed, method: str, raw: bytes) -> None:
    call: Any
    if method.startswith("Stream"):
        call = fuzzed.channel.unary_stream(f"/meshserve.llm.v1.LlmService/{method}")
    else:
        call = fuzzed.channel.unary_unary(f"/meshserve.llm.v1.LlmService/{method}")
    metadata = (("authorization", f"Bearer {fuzzed.mesh.user_key}"),)
    try:
        reply = call(raw, metadata=metadata, timeout=30)
        if method.startswith("Stream"):
            list(reply)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
        assert len(exc.details() or "") <= 4096
    _seen("native gRPC bytes", code.name)
    assert code in CALLER_CODES, code
