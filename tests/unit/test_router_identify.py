"""The router's Identify: generation calls by their own API key where the router checks keys (identity headers a
client sends are never believed then), every other call by the edge's identity headers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.auth.authenticator import Authenticator
from services.auth.keys import Grant, KeyRecord, hash_secret, new_secret
from services.router import access
from services.router.caller import INTERNAL
from services.router.servicer import Identify
from services.runtime.errors import Unauthenticated

SECRET = new_secret()
RECORD = KeyRecord(key_id="key_1", tenant="acme", allowed_models=("m",), tokens_per_minute=7, budget="5/day")
FORGED = (("x-meshserve-tenant", "other"), ("x-meshserve-key-id", "key_forged"), ("x-meshserve-models", "*"))


class Store:
    async def lookup(self, secret_hash: str) -> Grant | None:
        return Grant(RECORD) if secret_hash == hash_secret(SECRET) else None


class Context:
    def __init__(self, *metadata: tuple[str, str]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


def keys() -> Authenticator:
    return Authenticator(Store())  # type: ignore[arg-type]


def generation(identify: Identify, *metadata: tuple[str, str]) -> Any:
    return asyncio.run(identify.generation(Context(*metadata), access.Access("m")))  # type: ignore[arg-type]


@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_a_generation_call_runs_as_its_keys_record_whatever_headers_it_forges(header: str) -> None:
    value = f"Bearer {SECRET}" if header == "authorization" else SECRET
    who, _ = generation(Identify(True, keys()), *FORGED, (header, value))
    assert (who.tenant, who.key_id, who.allowed_models) == ("acme", "key_1", frozenset({"m"}))
    assert (who.tokens_per_minute, who.requests_per_minute, who.budget) == (7, 0, "5/day")


def test_a_generation_call_without_a_key_is_refused_even_by_a_router_that_trusts_internal_callers() -> None:
    with pytest.raises(Unauthenticated):
        generation(Identify(False, keys()), *FORGED)
    with pytest.raises(Unauthenticated):
        generation(Identify(True, keys()), ("authorization", "Bearer msk-" + "x" * 40))


def test_without_the_key_store_and_on_other_calls_the_edges_identity_headers_decide() -> None:
    edge = (("x-meshserve-tenant", "acme"), ("x-meshserve-key-id", "key_1"), ("x-meshserve-models", "a,b"))
    who, _ = generation(Identify(True), *edge)
    assert (who.tenant, who.key_id, who.allowed_models) == ("acme", "key_1", frozenset({"a", "b"}))
    listed, _ = Identify(True, keys()).edge(Context(*edge), access.Access("ListModels"))  # type: ignore[arg-type]
    assert listed.key_id == "key_1"
    assert generation(Identify(False))[0] == INTERNAL
    with pytest.raises(Unauthenticated):
        generation(Identify(True))
