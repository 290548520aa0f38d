"""The response cache through the whole mesh on real vLLM, with the OpenAI SDK: hits, scopes, bypass, streamed
replays, and billing's ledger of cached answers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from meshserve.billing.v1 import billing_pb2
from services.mesh.local import LocalMesh
from tests.e2e.helpers import MODEL, QUESTION, create_key, openai_client, scrape, usage_lines, value

pytestmark = pytest.mark.mesh

HEADER = "x-meshserve-cache"
LOOKUPS = "meshserve_router_cache_lookups_total"


@pytest.fixture(scope="module")
def cached(mesh: LocalMesh) -> Iterator[LocalMesh]:
    """The session mesh with the chat model's answers cached per tenant (its catalogue rewritten, as an
    operator would, and followed by the router), then as it was."""
    path = mesh.options.state_dir / "router.catalogue.yaml"
    original = path.read_text()
    catalogue = yaml.safe_load(original)
    for model in catalogue["models"]:
        if model["id"] == MODEL:
            model["cache"] = "tenant"
    path.write_text(yaml.safe_dump(catalogue))
    _, secret = create_key(mesh, "cache-probe")
    client = openai_client(mesh, secret)
    try:
        deadline = time.monotonic() + 30
        while True:
            raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=QUESTION, max_tokens=1)
            if HEADER in raw.headers or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert raw.headers.get(HEADER) == "miss", "the router did not take the catalogue's cache setting"
        yield mesh
    finally:
        path.write_text(original)
        time.sleep(3)  # the router follows the file every 2 s


def ask(mesh: LocalMesh, secret: str, **kw: Any) -> tuple[str, str, Any]:
    """(cache header, content, usage) of a deterministic chat request."""
    client = openai_client(mesh, secret)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=QUESTION, max_tokens=12, temperature=0, **kw
    )
    reply = raw.parse()
    return raw.headers[HEADER], reply.choices[0].message.content, reply.usage


def ledger(mesh: LocalMesh, key_id: str, requests: int) -> billing_pb2.UsageLine:
    return usage_lines(mesh, key_id, lambda lines: bool(lines) and lines[0].requests >= requests)[0]


def test_a_second_identical_request_is_a_hit_with_the_same_answer_and_billed_as_cached(cached: LocalMesh) -> None:
    key, secret = create_key(cached, "cache-a")
    hits = value(scrape(cached, "router"), LOOKUPS, model=MODEL, result="hit")
    said, first, told = ask(cached, secret)
    assert said == "miss"
    said, again, told_again = ask(cached, secret)
    assert (said, again) == ("hit", first)
    assert (told_again.prompt_tokens, told_again.completion_tokens) == (told.prompt_tokens, told.completion_tokens)
    assert value(scrape(cached, "router"), LOOKUPS, model=MODEL, result="hit") == hits + 1

    line = ledger(cached, key.key_id, 2)
    assert (line.requests, line.cached) == (2, 1)
    # The generated answer is billed as generated, the cached one apart, token for token as the client was told.
    assert (line.prompt_tokens, line.completion_tokens) == (told.prompt_tokens, told.completion_tokens)
    assert (line.cached_prompt_tokens, line.cached_completion_tokens) == (
        told_again.prompt_tokens,
        told_again.completion_tokens,
    )
    # The default price table charges nothing for cached tokens: the cost is the generated answer's alone.
    assert line.cost == ledger_cost_of_one(cached, told.prompt_tokens, told.completion_tokens)


def ledger_cost_of_one(mesh: LocalMesh, prompt_tokens: int, completion_tokens: int) -> str:
    from services.billing.prices import Prices

    prices = Prices.from_yaml(mesh.options.prices)
    return str(prices.cost(MODEL, prompt_tokens, completion_tokens))


def test_another_tenant_misses_and_no_cache_bypasses(cached: LocalMesh) -> None:
    _, secret = create_key(cached, "cache-b")
    _, other = create_key(cached, "cache-c")
    assert ask(cached, secret)[0] == "miss"
    assert ask(cached, secret)[0] == "hit"
    assert ask(cached, other)[0] == "miss"  # one tenant never sees another's answer
    assert ask(cached, secret, extra_headers={"Cache-Control": "no-cache"})[0] == "miss"
    # Sampled requests are never answered from the cache.
    client = openai_client(cached, secret)
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=QUESTION, max_tokens=4)
        assert raw.headers[HEADER] == "miss"


def test_a_streamed_hit_replays_the_chunks_and_done(cached: LocalMesh) -> None:
    _, secret = create_key(cached, "cache-d")
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 12, "temperature": 0, "stream": True}

    def events() -> tuple[str, list[str]]:
        headers = {"authorization": f"Bearer {secret}"}
        url = f"{cached.edge_url}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            return r.headers[HEADER], lines

    said, first = events()
    assert said == "miss" and first[-1] == "data: [DONE]"
    said, again = events()
    assert said == "hit" and again[-1] == "data: [DONE]" and len(again) == len(first)

    def choices(lines: list[str]) -> list[Any]:
        return [json.loads(line.removeprefix("data: "))["choices"] for line in lines[:-1]]

    assert choices(again) == choices(first)
    # The SDK reads the replay as any stream.
    stream = openai_client(cached, secret).chat.completions.create(**body)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "".join(c[0]["delta"].get("content") or "" for c in choices(first) if c)
