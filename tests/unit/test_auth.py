"""API keys without Redis: bearer parsing, decisions, and the cache with its invalidation."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.auth.authenticator import Authenticator
from services.auth.keys import Grant, KeyRecord, decide, hash_secret, new_secret, parse_bearer
from services.runtime.errors import PermissionDenied, Unauthenticated, Unavailable

RECORD = KeyRecord(key_id="key_1", tenant="acme")


@pytest.mark.parametrize(
    ("header", "says"),
    [
        (None, "missing Authorization"),
        ("", "missing Authorization"),
        ("Basic abc", "malformed Authorization"),
        ("Bearer", "malformed Authorization"),
        ("Bearer sk-abcdefghijklmnopqrstuvwxyz", "malformed API key"),
        ("Bearer msk-short", "malformed API key"),
    ],
)
def test_bad_authorization_headers_say_what_is_wrong(header: str | None, says: str) -> None:
    with pytest.raises(Unauthenticated, match=says):
        parse_bearer(header)


def test_secrets_are_long_random_and_recognisable() -> None:
    a, b = new_secret(), new_secret()
    assert a != b and a.startswith("msk-") and len(a) > 40
    assert parse_bearer(f"Bearer {a}") == a
    assert hash_secret(a) != a and len(hash_secret(a)) == 64


@pytest.mark.parametrize(
    ("grant", "admin_call", "error", "says"),
    [
        (None, False, Unauthenticated, "invalid API key"),
        (Grant(replace(RECORD, revoked_at=5.0)), False, Unauthenticated, "revoked"),
        (Grant(replace(RECORD, expires_at=9.0)), False, Unauthenticated, "expired"),
        (Grant(RECORD, not_after=10.0), False, Unauthenticated, "rotated"),
        (Grant(RECORD), True, PermissionDenied, "not an admin key"),
    ],
)
def test_decisions_refuse_with_the_reason(grant: Grant | None, admin_call: bool, error: type, says: str) -> None:
    with pytest.raises(error, match=says):
        decide(grant, now=10.0, admin_call=admin_call)


def test_decisions_allow_valid_keys() -> None:
    assert decide(Grant(RECORD, not_after=11.0), now=10.0, admin_call=False) == RECORD
    assert decide(Grant(replace(RECORD, admin=True)), now=10.0, admin_call=True).admin


def test_records_round_trip_without_secrets() -> None:
    secret = new_secret()
    record = replace(RECORD, allowed_models=("a",)).with_secret(secret)
    assert secret not in record.to_json()
    assert KeyRecord.from_json(record.to_json()) == record
    assert record.secret_hashes == (hash_secret(secret),)


class FakeStore:
    def __init__(self) -> None:
        self.grants: dict[str, Grant] = {}
        self.lookups = 0

    async def lookup(self, secret_hash: str) -> Grant | None:
        self.lookups += 1
        return self.grants.get(secret_hash)


async def test_known_keys_are_decided_from_the_cache_until_a_change_arrives() -> None:
    store = FakeStore()
    secret = new_secret()
    store.grants[hash_secret(secret)] = Grant(RECORD)
    auth = Authenticator(store, clock=lambda: 100.0)  # type: ignore[arg-type]
    auth.subscribed.set()
    for _ in range(5):
        assert (await auth.check(f"Bearer {secret}")).key_id == "key_1"
    assert store.lookups == 1
    store.grants[hash_secret(secret)] = Grant(replace(RECORD, revoked_at=99.0))
    auth.invalidate("key_1")
    with pytest.raises(Unauthenticated, match="revoked"):
        await auth.check(f"Bearer {secret}")
    assert store.lookups == 2


async def test_without_the_change_subscription_every_check_goes_to_the_store() -> None:
    store = FakeStore()
    secret = new_secret()
    store.grants[hash_secret(secret)] = Grant(RECORD)
    auth = Authenticator(store, clock=lambda: 100.0)  # type: ignore[arg-type]
    await auth.check(f"Bearer {secret}")
    await auth.check(f"Bearer {secret}")
    assert store.lookups == 2


async def test_the_cache_is_bounded() -> None:
    store = FakeStore()
    auth = Authenticator(store, max_entries=3, clock=lambda: 1.0)  # type: ignore[arg-type]
    auth.subscribed.set()
    for _ in range(10):
        with pytest.raises(Unauthenticated):
            await auth.check(f"Bearer {new_secret()}")
    assert len(auth._cache) == 3


class OutageStore(FakeStore):
    """A store that can be made unreachable."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def lookup(self, secret_hash: str) -> Grant | None:
        if self.down:
            raise Unavailable("the key store is unreachable: ConnectionError")
        return await super().lookup(secret_hash)


async def test_an_outage_is_answered_from_the_cache_for_the_grace_window_only() -> None:
    store, now = OutageStore(), [100.0]
    known, unknown = new_secret(), new_secret()
    store.grants[hash_secret(known)] = Grant(RECORD)
    auth = Authenticator(store, clock=lambda: now[0], outage_grace_seconds=60)  # type: ignore[arg-type]
    auth.subscribed.set()
    await auth.check(f"Bearer {known}")
    auth.subscribed.clear()  # the subscription breaks with Redis: every check asks the store first
    store.down = True
    now[0] = 130.0
    assert (await auth.check(f"Bearer {known}")).key_id == "key_1"
    with pytest.raises(Unavailable, match="not checked recently"):
        await auth.check(f"Bearer {unknown}")
    now[0] = 191.0  # 61 s into the outage
    with pytest.raises(Unavailable):
        await auth.check(f"Bearer {known}")


async def test_a_revocation_made_during_an_outage_applies_when_the_store_answers_again() -> None:
    store, now = OutageStore(), [100.0]
    secret = new_secret()
    store.grants[hash_secret(secret)] = Grant(RECORD)
    auth = Authenticator(store, clock=lambda: now[0])  # type: ignore[arg-type]
    auth.subscribed.set()
    await auth.check(f"Bearer {secret}")
    auth.subscribed.clear()
    store.down = True
    assert (await auth.check(f"Bearer {secret}")).key_id == "key_1"
    store.grants[hash_secret(secret)] = Grant(replace(RECORD, revoked_at=101.0))  # revoked meanwhile
    store.down = False
    now[0] = 102.0
    with pytest.raises(Unauthenticated, match="revoked"):
        await auth.check(f"Bearer {secret}")


async def test_with_no_grace_an_outage_refuses_at_once() -> None:
    store = OutageStore()
    secret = new_secret()
    store.grants[hash_secret(secret)] = Grant(RECORD)
    auth = Authenticator(store, clock=lambda: 100.0, outage_grace_seconds=0)  # type: ignore[arg-type]
    await auth.check(f"Bearer {secret}")
    store.down = True
    with pytest.raises(Unavailable):
        await auth.check(f"Bearer {secret}")
