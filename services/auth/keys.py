"""API keys: records, secrets and their hashes, and the decision for a presented secret. No I/O."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from meshserve.auth.v1 import auth_pb2
from services.runtime.errors import InvalidArgument, PermissionDenied, Unauthenticated

SECRET_PREFIX = "msk-"
# gRPC paths of the admin API: only admin keys may call them.
ADMIN_PATH_PREFIX = "/" + auth_pb2.DESCRIPTOR.services_by_name["AuthAdminService"].full_name + "/"
# 32 random bytes: with this much entropy a plain SHA-256 is the right hash (no need to slow guessing).
_SECRET_BYTES = 32


def new_secret() -> str:
    """A fresh bearer secret, e.g. msk-Zk3...; shown once, never stored."""
    return SECRET_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def hash_secret(secret: str) -> str:
    """What the store keeps instead of the secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_bearer(header: str | None) -> str:
    """The secret of an `Authorization: Bearer msk-...` header, or Unauthenticated saying what is wrong."""
    if not header:
        raise Unauthenticated("missing Authorization header: send 'Authorization: Bearer <API key>' (or x-api-key)")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("malformed Authorization header: expected 'Bearer <API key>'")
    if not token.startswith(SECRET_PREFIX) or not 20 <= len(token) <= 200:
        raise Unauthenticated(f"malformed API key: meshserve keys start with '{SECRET_PREFIX}'")
    return token


# Anthropic's SDK sends the key alone in this header; the Authorization header wins where both are sent.
API_KEY_HEADER = "x-api-key"


def authorization(headers: Mapping[str, str]) -> str | None:
    """The request's credential as an Authorization header value, from Authorization or x-api-key."""
    if headers.get("authorization"):
        return headers["authorization"]
    key = headers.get(API_KEY_HEADER, "").strip()
    return f"Bearer {key}" if key else None


@dataclass(frozen=True)
class KeyRecord:
    """A key as stored: everything but its secrets (only their hashes)."""

    key_id: str
    tenant: str
    label: str = ""
    allowed_models: tuple[str, ...] = ()
    admin: bool = False
    expires_at: float | None = None
    created_at: float = 0.0
    revoked_at: float | None = None
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    # The key's spend budget, "<amount>/<period>" (ratelimit.budgets.Budget); empty: none.
    budget: str = ""
    secret_prefix: str = ""
    # Hashes of the secrets that may still work: the current one first.
    secret_hashes: tuple[str, ...] = field(default=())

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> KeyRecord:
        data: dict[str, Any] = json.loads(raw)
        data["allowed_models"] = tuple(data.get("allowed_models") or ())
        data["secret_hashes"] = tuple(data.get("secret_hashes") or ())
        return cls(**data)

    def with_secret(self, secret: str) -> KeyRecord:
        """The record with secret as its current secret (older hashes kept after it)."""
        return replace(
            self,
            secret_prefix=secret[: len(SECRET_PREFIX) + 4],
            secret_hashes=(hash_secret(secret), *self.secret_hashes),
        )

    def may_use(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models


@dataclass(frozen=True)
class Grant:
    """What a secret resolves to: its key, and until when this secret works (rotation grace)."""

    record: KeyRecord
    not_after: float | None = None


def validate_new_key(tenant: str, expires_at: float | None, now: float) -> None:
    if not tenant:
        raise InvalidArgument("tenant: is required")
    if len(tenant) > 128 or any(c in tenant for c in ",\n\r "):
        raise InvalidArgument("tenant: at most 128 characters, without spaces, commas or newlines")
    if expires_at is not None and expires_at <= now:
        raise InvalidArgument("expires_at: must be in the future")


def decide(grant: Grant | None, now: float, admin_call: bool) -> KeyRecord:
    """The key a request runs as, or the error the caller sees. Messages never include the secret."""
    if grant is None:
        raise Unauthenticated("invalid API key")
    record = grant.record
    if record.revoked_at is not None:
        raise Unauthenticated(f"API key {record.key_id} was revoked")
    if grant.not_after is not None and now >= grant.not_after:
        raise Unauthenticated(f"this secret of API key {record.key_id} was rotated and its grace period is over")
    if record.expires_at is not None and now >= record.expires_at:
        raise Unauthenticated(f"API key {record.key_id} expired")
    if admin_call and not record.admin:
        raise PermissionDenied(f"API key {record.key_id} is not an admin key")
    return record
