"""External providers through the whole mesh with the OpenAI SDK: vLLM's own server on the same model stands in
for a cloud provider (never an address outside this machine), and a local mock answers 500 and records what it
was sent. Provider-only models, fallback with every local replica down, failover from a provider's 500, the
provider's key (never the client's) upstream, and the ledger's rows per backend."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from meshserve.billing.v1 import billing_pb2
from services.mesh.local import LocalMesh, MeshOptions
from tests.e2e.helpers import MODEL, QUESTION, create_key, openai_client, scrape, usage_lines, value

pytestmark = pytest.mark.mesh

REMOTE = "smollm2-remote"  # served by the provider only
FALLBACK = "smollm2-fallback"  # its one replica never answers: the providers do
PROVIDER_KEY = "sk-provider-only-the-provider-sees"
BACKENDS = "meshserve_router_backend_requests_total"


class Down(BaseHTTPRequestHandler):
    """A provider that fails every request with a 500, keeping the headers it was sent."""

    seen: list[dict[str, str]] = []

    def do_POST(self) -> None:
        self.seen.append({k.lower(): v for k, v in self.headers.items()})
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps({"error": {"message": "down", "type": "server_error"}}).encode()
        self.send_response(500)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def down() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Down)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture(scope="module")
def providers(
    mesh: LocalMesh, vllm_url: str, down: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalMesh]:
    """The session mesh with two provider models in its catalogue (rewritten, as an operator would, and
    followed by the router), the provider's key in a file as a mounted Secret gives it; then as it was."""
    secret = tmp_path_factory.mktemp("secret") / "api-key"
    secret.write_text(PROVIDER_KEY + "\n")
    path = mesh.options.state_dir / "router.catalogue.yaml"
    original = path.read_text()
    catalogue = yaml.safe_load(original)
    catalogue["providers"] = [
        {"name": "vllm", "base_url": f"{vllm_url}/v1", "api_key_file": str(secret), "max_tokens": 32},
        {"name": "down", "base_url": down, "api_key_file": str(secret)},
    ]
    catalogue["models"] += [
        {"id": REMOTE, "providers": [{"provider": "vllm", "model": MODEL}], "required_for_ready": False},
        {
            "id": FALLBACK,
            "replicas": ["127.0.0.1:1"],
            "required_for_ready": False,
            "providers": [{"provider": "down", "model": MODEL}, {"provider": "vllm", "model": MODEL}],
        },
    ]
    path.write_text(yaml.safe_dump(catalogue))
    _, probe = create_key(mesh, "provider-probe")
    client = openai_client(mesh, probe)
    try:
        deadline = time.monotonic() + 30
        while not {REMOTE, FALLBACK} <= {m.id for m in client.models.list()}:
            assert time.monotonic() < deadline, "the router did not take the catalogue's providers"
            time.sleep(0.5)
        yield mesh
    finally:
        path.write_text(original)
        time.sleep(3)  # the router follows the file every 2 s


def oracle(vllm_url: str, **fields: object) -> str:
    reply = httpx.post(f"{vllm_url}/v1/chat/completions", json={"model": MODEL, **fields}, timeout=120)
    return str(reply.json()["choices"][0]["message"]["content"])


def test_a_provider_only_model_answers_as_the_provider_does_unary_and_streamed(
    providers: LocalMesh, vllm_url: str
) -> None:
    _, secret = create_key(providers, "provider-a")
    client = openai_client(providers, secret)
    asked = {"messages": QUESTION, "max_tokens": 12, "temperature": 0}
    reply = client.chat.completions.create(model=REMOTE, **asked)  # type: ignore[call-overload]
    assert reply.model == REMOTE and reply.choices[0].message.content == oracle(vllm_url, **asked)
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    stream = client.chat.completions.create(model=REMOTE, stream=True, **asked)  # type: ignore[call-overload]
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert all(c.usage is None for c in chunks)  # the client did not ask for the usage chunk


def test_fallback_answers_with_every_local_replica_down_past_a_provider_failing_with_500(
    providers: LocalMesh, vllm_url: str
) -> None:
    key, secret = create_key(providers, "provider-b")
    before = value(scrape(providers, "router"), BACKENDS, model=FALLBACK, backend="vllm", use="fallback")
    Down.seen.clear()
    client = openai_client(providers, secret)
    asked = {"messages": QUESTION, "max_tokens": 8, "temperature": 0}
    reply = client.chat.completions.create(model=FALLBACK, **asked)  # type: ignore[call-overload]
    assert reply.choices[0].message.content == oracle(vllm_url, **asked)
    # The failing provider was tried first, with the provider's key: the client's never left the mesh.
    assert Down.seen and Down.seen[0]["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert all(secret not in json.dumps(h) for h in Down.seen)
    after = value(scrape(providers, "router"), BACKENDS, model=FALLBACK, backend="vllm", use="fallback")
    assert after == before + 1
    # Billed under the provider's name for the model, token for token as the client was told.
    line = usage_line(providers, key.key_id, f"{FALLBACK}@vllm")
    assert reply.usage is not None
    assert (line.requests, line.prompt_tokens, line.completion_tokens) == (
        1,
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
    )


def usage_line(mesh: LocalMesh, key_id: str, model: str) -> billing_pb2.UsageLine:
    lines = usage_lines(mesh, key_id, lambda lines: any(line.model == model for line in lines))
    matching = [line for line in lines if line.model == model]
    assert matching, f"no usage line of {model}: {[line.model for line in lines]}"
    return matching[0]


def test_a_request_the_contract_refuses_never_reaches_a_provider(providers: LocalMesh) -> None:
    _, secret = create_key(providers, "provider-c")
    Down.seen.clear()
    headers = {"authorization": f"Bearer {secret}"}
    body = {"model": FALLBACK, "messages": QUESTION, "max_tokens": 4, "n": 0}
    reply = httpx.post(f"{providers.edge_url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    # A request the contract refuses never reaches a backend, local or external.
    assert reply.status_code == 400 and "n: must be at least 1" in reply.json()["error"]["message"]
    assert not Down.seen


@pytest.fixture(scope="module")
def saturated(model_dir: Path, vllm_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """A mesh of its own whose replica takes 2 requests at once and whose router queues 2 more, the chat
    model overflowing to vLLM's own server for tenant burst-on as soon as a request would wait."""
    state = tmp_path_factory.mktemp("saturated")
    secret = state / "provider-key"
    secret.write_text(PROVIDER_KEY)
    env = {"MESHSERVE_INFERENCE_MAX_NUM_SEQS": "2", "MESHSERVE_ROUTER_QUEUE_SIZE": "2"}
    rules = Path(__file__).with_name("ratelimits.yaml")
    options = MeshOptions(state_dir=state, model=MODEL, model_store=model_dir.parent, ratelimit_rules=rules, env=env)
    mesh = LocalMesh(options)
    try:
        mesh.start(timeout=600)
        path = state / "router.catalogue.yaml"
        catalogue = yaml.safe_load(path.read_text())
        catalogue["providers"] = [{"name": "vllm", "base_url": f"{vllm_url}/v1", "api_key_file": str(secret)}]
        [chat] = [m for m in catalogue["models"] if m["id"] == MODEL]
        chat["providers"] = [{"provider": "vllm", "model": MODEL, "use": "overflow"}]
        chat["overflow"] = {"tenants": ["burst-on"], "wait_seconds": 0}
        catalogue["models"].append({"id": REMOTE, "providers": [{"provider": "vllm", "model": MODEL}]})
        path.write_text(yaml.safe_dump(catalogue))
        _, probe = create_key(mesh, "burst-probe")
        deadline = time.monotonic() + 30
        while REMOTE not in {m.id for m in openai_client(mesh, probe).models.list()}:
            assert time.monotonic() < deadline, "the router did not take the catalogue's providers"
            time.sleep(0.5)
        yield mesh
    finally:
        mesh.stop()


def burst(mesh: LocalMesh, secret: str, requests: int) -> list[int]:
    """The status codes of requests chat requests sent at once."""
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 24, "temperature": 0, "ignore_eos": True}

    async def all_at_once() -> list[int]:
        headers = {"authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(base_url=mesh.edge_url, headers=headers, timeout=120) as client:
            replies = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(requests)))
        return [r.status_code for r in replies]

    return asyncio.run(all_at_once())


def test_under_saturation_the_excess_of_a_tenant_allowed_to_overflow_goes_to_the_provider_not_to_429(
    saturated: LocalMesh,
) -> None:
    mesh = saturated
    _, refused = create_key(mesh, "burst-off")
    key, allowed = create_key(mesh, "burst-on")
    codes = burst(mesh, refused, 8)
    # 2 generating and 2 queued: a tenant that may not overflow hears 429 for the rest.
    assert codes.count(429) >= 1 and codes.count(200) >= 4, codes
    assert value(scrape(mesh, "router"), BACKENDS, model=MODEL, use="overflow") == 0
    codes = burst(mesh, allowed, 8)
    assert codes == [200] * 8
    overflowed = value(scrape(mesh, "router"), BACKENDS, model=MODEL, backend="vllm", use="overflow")
    assert overflowed >= 4
    # The ledger keeps the provider's answers apart, one row per backend, as many as the metric counted.
    lines = usage_lines(mesh, key.key_id, lambda ls: sum(line.requests for line in ls) >= 8)
    by_model = {line.model: line.requests for line in lines}
    assert by_model == {f"{MODEL}@vllm": overflowed, MODEL: 8 - overflowed}
