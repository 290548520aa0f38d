"""External providers (services/router/providers.py) and their place in routing: the catalogue's rules, the
upstream call through the openai SDK (its transport faked here), and only / fallback / overflow / failover."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from meshserve.billing.v1 import billing_pb2
from meshserve.inference.v1 import inference_pb2 as ipb
from services.router.admission import Admission
from services.router.caller import Caller, RouteHints
from services.router.catalogue import Catalogue, ModelEntry, ProviderConfig, ProviderRoute, Version
from services.router.completions import Completions
from services.router.openai_api import CHAT, OpenAIApi, ResponseMeta
from services.router.providers import ProviderBackend, Providers, api_key, backend_of
from services.runtime.errors import FailedPrecondition, InvalidArgument, Unavailable
from tests.unit.test_completions import FakeBudget, FakeDirectory
from tests.unit.test_response_cache import ServingReplica, Usage

ACME = Caller(tenant="acme", key_id="key_a", allowed_models=None)
OTHER = Caller(tenant="other", key_id="key_o", allowed_models=None)
QUESTION = [{"role": "user", "content": "Capital of France?"}]
CLIENT_KEY = "sk-client-secret"
PROVIDER_KEY = "sk-provider-secret"


class Upstream:
    """An OpenAI-compatible provider as an httpx transport: answers chat, records what it was sent."""

    def __init__(self, status: int = 200, broken: bool = False) -> None:
        self.status = status
        self.broken = broken  # a stream that fails after its first chunk
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append((dict(request.headers), body))
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": "upstream says no", "type": "x"}})
        usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
        if not body.get("stream"):
            message = {"role": "assistant", "content": "Paris"}
            answer = {"id": "up-1", "object": "chat.completion", "created": 1, "model": body["model"]}
            answer |= {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": usage}
            return httpx.Response(200, json=answer)
        chunk = {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        events = [
            {**chunk, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}], "usage": None}
            for text in ("Par", "is")
        ]
        if self.broken:
            events[1:] = [{"error": {"message": "the provider's engine died", "type": "server_error"}}]
        events.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None})
        events.append({**chunk, "choices": [], "usage": usage})
        sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})


CLOUD = ProviderConfig("cloud", "http://cloud.test/v1", api_key_env="CLOUD_KEY", max_tokens=64)
SPARE = ProviderConfig("spare", "http://spare.test/v1", api_key_env="SPARE_KEY", max_tokens=64)


def clients(upstreams: dict[str, Upstream]) -> Callable[[ProviderConfig, str], openai.AsyncOpenAI]:
    """The openai clients of providers, each over its upstream's transport."""

    def client(config: ProviderConfig, key: str) -> openai.AsyncOpenAI:
        transport = httpx.MockTransport(upstreams[config.name].handle)
        return openai.AsyncOpenAI(
            base_url=config.base_url, api_key=key, max_retries=0, http_client=httpx.AsyncClient(transport=transport)
        )

    return client


def providers(upstreams: dict[str, Upstream], configs: tuple[ProviderConfig, ...] = (CLOUD, SPARE)) -> Providers:
    return Providers(lambda: {c.name: c for c in configs}, clients(upstreams))


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUD_KEY", PROVIDER_KEY)
    monkeypatch.setenv("SPARE_KEY", PROVIDER_KEY + "-spare")


def api(
    entry: ModelEntry, upstreams: dict[str, Upstream], replica: ServingReplica | None = None, **kw: Any
) -> tuple[OpenAIApi, Usage]:
    usage = Usage()
    directory = FakeDirectory(replica) if replica is not None else FakeDirectory()  # type: ignore[arg-type]
    catalogue = Catalogue([entry], {"cloud": CLOUD, "spare": SPARE})
    completions = Completions(
        lambda: catalogue,
        directory,
        usage=usage,
        providers=providers(upstreams),
        **kw,  # type: ignore[arg-type]
    )
    return OpenAIApi(completions.pipeline), usage


def only(*routes: ProviderRoute) -> ModelEntry:
    return ModelEntry("m", (Version("default", 1.0, ()),), 1, "meshserve", providers=routes)


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": QUESTION, **fields}).encode()


async def test_a_provider_only_model_relays_the_answer_under_the_clients_name_with_the_providers_usage() -> None:
    cloud = Upstream()
    openai_api, usage = api(only(ProviderRoute("cloud", "big-model", "only")), {"cloud": cloud})
    out = json.loads(await openai_api.whole(CHAT, chat(max_tokens=8), ACME, RouteHints(), ResponseMeta()))
    assert out["choices"][0]["message"]["content"] == "Paris" and out["model"] == "m"
    headers, sent = cloud.requests[0]
    # The provider gets its own name for the model and its own key, never the client's.
    assert sent["model"] == "big-model" and sent["messages"] == QUESTION and sent["max_tokens"] == 8
    assert headers["authorization"] == f"Bearer {PROVIDER_KEY}" and CLIENT_KEY not in json.dumps(headers)
    [record] = usage.records
    # Billed under the provider's name for the model: its own ledger rows and price table entry.
    assert (record.model, record.prompt_tokens, record.completion_tokens) == ("m@cloud", 9, 2)


async def test_a_stream_is_relayed_with_done_and_the_usage_chunk_only_where_asked() -> None:
    cloud = Upstream()
    openai_api, usage = api(only(ProviderRoute("cloud", "big-model", "only")), {"cloud": cloud})
    events = [e async for e in openai_api.stream(CHAT, chat(), ACME, RouteHints(), ResponseMeta())]
    assert events[-1] == b"data: [DONE]\n\n"
    bodies = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert "".join(c["delta"].get("content", "") for b in bodies for c in b["choices"]) == "Paris"
    assert all("usage" not in b and b["model"] == "m" for b in bodies)
    # Usage is always asked of the provider (billing needs its counts), and the request's maximum reserved.
    assert cloud.requests[0][1]["stream_options"] == {"include_usage": True}
    assert cloud.requests[0][1]["max_tokens"] == CLOUD.max_tokens
    assert (usage.records[0].prompt_tokens, usage.records[0].completion_tokens) == (9, 2)
    events = [
        e
        async for e in openai_api.stream(
            CHAT, chat(stream_options={"include_usage": True}), ACME, RouteHints(), ResponseMeta()
        )
    ]
    assert json.loads(events[-2].removeprefix(b"data: "))["usage"]["completion_tokens"] == 2


async def test_a_provider_failing_before_its_first_token_is_ejected_and_the_next_answers() -> None:
    down, spare = Upstream(500), Upstream()
    entry = only(ProviderRoute("cloud", "big-model", "only"), ProviderRoute("spare", "big", "only"))
    openai_api, usage = api(entry, {"cloud": down, "spare": spare})
    out = json.loads(await openai_api.whole(CHAT, chat(), ACME, RouteHints(), ResponseMeta()))
    assert out["choices"][0]["message"]["content"] == "Paris"
    assert len(down.requests) == 1 and len(spare.requests) == 1
    assert spare.requests[0][0]["authorization"] == f"Bearer {PROVIDER_KEY}-spare"
    await openai_api.whole(CHAT, chat(), ACME, RouteHints(), ResponseMeta())
    assert len(down.requests) == 1  # ejected: not tried again at once
    assert [r.outcome for r in usage.records] == [billing_pb2.OUTCOME_COMPLETED] * 2
    assert (backend_of("provider:spare/big"), backend_of("10.0.0.1:50051")) == ("spare", "local")


async def test_a_provider_refusing_the_request_is_the_clients_400_and_every_provider_down_a_503() -> None:
    openai_api, _ = api(only(ProviderRoute("cloud", "big-model", "only")), {"cloud": Upstream(400)})
    with pytest.raises(InvalidArgument, match="upstream says no"):
        await openai_api.whole(CHAT, chat(), ACME, RouteHints(), ResponseMeta())
    openai_api, _ = api(only(ProviderRoute("cloud", "big-model", "only")), {"cloud": Upstream(503)})
    with pytest.raises(Unavailable, match="no provider backend of m answered: provider cloud answered 503"):
        await openai_api.whole(CHAT, chat(), ACME, RouteHints(), ResponseMeta())


async def test_fallback_answers_while_no_local_replica_is_in_rotation() -> None:
    replica, cloud = ServingReplica(), Upstream()
    routes = (ProviderRoute("cloud", "b", "fallback"),)
    entry = ModelEntry("m", (Version("v1", 1.0, (replica.address,)),), 1, "meshserve", providers=routes)
    openai_api, usage = api(entry, {"cloud": cloud}, replica)
    await openai_api.whole(CHAT, chat(), ACME, RouteHints(), ResponseMeta())
    assert (len(replica.served), len(cloud.requests)) == (1, 0)  # local first
    assert usage.records[0].model == "m"
    openai_api._pipeline.replicas.state[replica.address].reported(None)  # type: ignore[attr-defined]
    out = json.loads(await openai_api.whole(CHAT, chat(), ACME, RouteHints(), ResponseMeta()))
    assert out["model"] == "m" and len(cloud.requests) == 1 and usage.records[1].model == "m@cloud"


async def test_overflow_takes_only_allowed_tenants_past_the_expected_wait() -> None:
    replica, cloud = ServingReplica(), Upstream()
    entry = ModelEntry(
        "m",
        (Version("v1", 1.0, (replica.address,)),),
        1,
        "meshserve",
        providers=(ProviderRoute("cloud", "b", "overflow"),),
        overflow_tenants=frozenset({"acme"}),
        overflow_wait_seconds=0.0,
    )
    admission = Admission(queue_size=8, queue_timeout_seconds=5)
    openai_api, usage = api(entry, {"cloud": cloud}, replica, admission=admission)
    # Every local slot taken (capacity 4): acme's request overflows, another tenant's waits its turn.
    slots = [admission.slot(("m", "v1"), lambda: 4) for _ in range(4)]
    for slot in slots:
        await slot.__aenter__()
    await openai_api.whole(CHAT, chat(), ACME, RouteHints(), ResponseMeta())
    assert (len(cloud.requests), len(replica.served)) == (1, 0)
    waiting = asyncio.ensure_future(openai_api.whole(CHAT, chat(), OTHER, RouteHints(), ResponseMeta()))
    await asyncio.sleep(0.05)
    assert not waiting.done() and len(cloud.requests) == 1
    for slot in slots:
        await slot.__aexit__(None, None, None)
    await waiting
    assert len(replica.served) == 1
    assert [r.model for r in usage.records] == ["m@cloud", "m"]


async def test_the_typed_v1_api_is_refused_by_a_provider_with_the_reason() -> None:
    backend = ProviderBackend(CLOUD, ProviderRoute("cloud", "b", "only"), lambda: openai.AsyncOpenAI(api_key="x"))
    with pytest.raises(FailedPrecondition, match="OpenAI-compatible API only"):
        await backend.count_tokens(ipb.GenerateRequest())


def test_a_missing_key_names_where_it_was_looked_for(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CLOUD_KEY")
    with pytest.raises(Unavailable, match="environment variable CLOUD_KEY"):
        api_key(CLOUD)
    secret = tmp_path / "key"
    secret.write_text(PROVIDER_KEY + "\n")
    assert api_key(ProviderConfig("f", "http://f", api_key_file=str(secret))) == PROVIDER_KEY


CATALOGUE = """
providers:
  - {name: cloud, base_url: 'https://api.example.com/v1/', api_key_env: CLOUD_KEY, max_concurrency: 8}
models:
  - id: local
    replicas: ['h:1']
    providers: [{provider: cloud, model: up, use: overflow}, {provider: cloud, model: up}]
    overflow: {tenants: [acme], wait_seconds: 0.5}
  - id: remote
    providers: [{provider: cloud, model: up-remote}]
"""


def test_the_catalogue_names_providers_and_each_models_uses_of_them(tmp_path: Path) -> None:
    path = tmp_path / "catalogue.yaml"
    path.write_text(CATALOGUE)
    catalogue = Catalogue.from_yaml(path)
    assert catalogue.providers["cloud"].base_url == "https://api.example.com/v1"
    assert catalogue.providers["cloud"].max_concurrency == 8
    local, remote = catalogue.entries()
    assert [r.use for r in local.providers] == ["overflow", "fallback"]
    assert (local.overflow_tenants, local.overflow_wait_seconds) == (frozenset({"acme"}), 0.5)
    assert remote.routes("only") == (ProviderRoute("cloud", "up-remote", "only"),) and not remote.targets()


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda c: c.replace("api_key_env: CLOUD_KEY", "api_key: sk-123"), r"providers\[0\]\.api_key: a key never"),
        (lambda c: c.replace("api_key_env: CLOUD_KEY, ", ""), r"providers\[0\]: needs one of api_key_env"),
        (lambda c: c.replace("'https://api.example.com/v1/'", "ftp://x"), r"base_url: must be an http"),
        (lambda c: c.replace("max_concurrency: 8", "max_concurrency: 0"), r"max_concurrency: must be a whole"),
        (lambda c: c.replace("model: up-remote", "model: up-remote, use: fallback"), r"use: must be only"),
        (lambda c: c.replace("model: up, use: overflow", "model: up, use: only"), r"use: must be fallback"),
        (lambda c: c.replace("provider: cloud, model: up-remote", "provider: moon, model: x"), r"must name a provider"),
        (lambda c: c.replace("tenants: [acme]", "tenants: acme"), r"overflow: must be"),
    ],
)
def test_a_wrong_provider_entry_is_refused_with_where(tmp_path: Path, change: Callable[[str], str], where: str) -> None:
    path = tmp_path / "catalogue.yaml"
    path.write_text(change(CATALOGUE))
    with pytest.raises(InvalidArgument, match=where):
        Catalogue.from_yaml(path)


def test_a_budgeted_provider_request_reserves_the_estimate_and_the_maximum() -> None:
    budget, cloud = FakeBudget(), Upstream()
    openai_api, _ = api(only(ProviderRoute("cloud", "b", "only")), {"cloud": cloud}, budget=budget)
    asyncio.run(openai_api.whole(CHAT, chat(max_tokens=5, n=2), ACME, RouteHints(), ResponseMeta()))
    [(_, prompt, most)] = budget.reserved
    assert most == 10 and prompt > 0
    assert budget.settled[0][1:3] == (9, 2)


class FailingReplica(ServingReplica):
    """A replica in rotation whose every request fails before its first token."""

    async def serve(self, *args: Any, **kw: Any) -> Any:  # type: ignore[override]
        raise Unavailable("inference replica fake:1 failed: UNAVAILABLE")
        yield


async def test_fallback_answers_when_every_local_replica_fails_before_its_first_token() -> None:
    replica, cloud = FailingReplica(), Upstream()
    routes = (ProviderRoute("cloud", "b", "fallback"),)
    entry = ModelEntry("m", (Version("v1", 1.0, (replica.address,)),), 1, "meshserve", providers=routes)
    openai_api, usage = api(entry, {"cloud": cloud}, replica)
    events = [e async for e in openai_api.stream(CHAT, chat(), ACME, RouteHints(), ResponseMeta())]
    assert events[-1] == b"data: [DONE]\n\n" and len(cloud.requests) == 1
    assert [r.model for r in usage.records] == ["m@cloud"]


async def test_a_provider_failing_after_its_first_token_is_an_in_band_error_and_billed_as_received() -> None:
    cloud = Upstream(broken=True)
    openai_api, usage = api(only(ProviderRoute("cloud", "b", "only")), {"cloud": cloud})
    events = [e async for e in openai_api.stream(CHAT, chat(), ACME, RouteHints(), ResponseMeta())]
    first = json.loads(events[0].removeprefix(b"data: "))
    assert first["choices"][0]["delta"]["content"] == "Par"
    error = json.loads(events[1].removeprefix(b"data: ").split(b"\n\n")[0])
    assert "provider cloud failed: the provider's engine died" in error["error"]["message"]
    assert events[-1].endswith(b"data: [DONE]\n\n")
    [record] = usage.records
    assert record.outcome == billing_pb2.OUTCOME_FAILED and record.model == "m@cloud"


async def test_a_rotated_key_is_used_from_the_next_request_and_a_changed_provider_gets_a_fresh_backend(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "api-key"
    secret.write_text("sk-old")
    config = ProviderConfig("cloud", "http://cloud.test/v1", api_key_file=str(secret))
    configs = {"cloud": config}
    cloud = Upstream()
    backends = Providers(lambda: configs, clients({"cloud": cloud}))
    route = ProviderRoute("cloud", "b", "only")
    start = ipb.ServeStart(endpoint=CHAT, model="m", body=chat())
    backend = backends.backend(route)
    _ = [r async for r in backend.serve(start, None)]
    secret.write_text("sk-new")
    _ = [r async for r in backends.backend(route).serve(start, None)]
    assert [h["authorization"] for h, _ in cloud.requests] == ["Bearer sk-old", "Bearer sk-new"]
    assert backends.backend(route) is backend  # the same routing state while the configuration stands
    configs["cloud"] = ProviderConfig("cloud", "http://cloud.test/v1", api_key_file=str(secret), timeout_seconds=5)
    assert backends.backend(route) is not backend
