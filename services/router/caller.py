"""Who is calling: the key the router checked itself (generation), or the identity the edge's auth check
attached to the request (every other call)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.auth.keys import KeyRecord
from services.runtime.errors import PermissionDenied, Unauthenticated, echo
from services.runtime.identity import (
    KEY_BUDGET_HEADER,
    KEY_ID_HEADER,
    KEY_RPM_HEADER,
    KEY_TPM_HEADER,
    MODEL_HEADER,
    MODELS_HEADER,
    NO_BUDGET,
    TENANT_HEADER,
)

# Routing hints a client may send (headers on REST, metadata on gRPC).
VERSION_HEADER = "x-meshserve-version"
SESSION_HEADER = "x-meshserve-session"
# What the response cache may do for the request (no-cache, no-store: services/router/cache.py).
CACHE_CONTROL_HEADER = "cache-control"


@dataclass(frozen=True)
class Caller:
    """A tenant's key and the models it may use (None: all)."""

    tenant: str
    key_id: str
    allowed_models: frozenset[str] | None
    # The key's own tokens-per-minute and requests-per-minute limits; 0 keeps its plan's.
    tokens_per_minute: int = 0
    requests_per_minute: int = 0
    # The key's spend budget, "<amount>/<period>"; empty: none.
    budget: str = ""

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models

    def require(self, model: str) -> None:
        if not self.may_use(model):
            raise PermissionDenied(f"API key {self.key_id} may not use model {echo(model)}")


# Trusted internal callers (require_caller off): every model, no tenant.
INTERNAL = Caller(tenant="", key_id="internal", allowed_models=None)


def from_metadata(metadata: Mapping[str, str], required: bool) -> Caller:
    """The caller described by the auth headers; without them, refused unless not required."""
    key_id = metadata.get(KEY_ID_HEADER, "")
    if not key_id:
        if required:
            raise Unauthenticated("no caller identity: requests must come through the edge with an API key")
        return INTERNAL
    models = metadata.get(MODELS_HEADER, "*")
    allowed = None if models == "*" else frozenset(m for m in models.split(",") if m)
    tpm, rpm = metadata.get(KEY_TPM_HEADER, "0"), metadata.get(KEY_RPM_HEADER, "0")
    return Caller(
        tenant=metadata.get(TENANT_HEADER, ""),
        key_id=key_id,
        allowed_models=allowed,
        tokens_per_minute=int(tpm) if tpm.isdigit() else 0,
        requests_per_minute=int(rpm) if rpm.isdigit() else 0,
        budget=budget if (budget := metadata.get(KEY_BUDGET_HEADER, NO_BUDGET)) != NO_BUDGET else "",
    )


def from_key(record: KeyRecord) -> Caller:
    """The caller a checked key makes (its record, as the edge's auth check would have put it in headers)."""
    return Caller(
        tenant=record.tenant,
        key_id=record.key_id,
        allowed_models=frozenset(record.allowed_models) if record.allowed_models else None,
        tokens_per_minute=record.tokens_per_minute,
        requests_per_minute=record.requests_per_minute,
        budget=record.budget,
    )


@dataclass(frozen=True)
class RouteHints:
    """How a client asked to be routed: a pinned model version, a session to keep on one replica, what the
    response cache may do."""

    version: str | None = None
    session: str | None = None
    # The model the edge read from the body, to which its per-model request limits applied.
    edge_model: str | None = None
    # The request's Cache-Control, for the response cache.
    cache_control: str | None = None


def hints_from_metadata(metadata: Mapping[str, str]) -> RouteHints:
    """The routing hints among a call's headers."""
    return RouteHints(
        version=metadata.get(VERSION_HEADER) or None,
        session=metadata.get(SESSION_HEADER) or None,
        edge_model=metadata.get(MODEL_HEADER) or None,
        cache_control=metadata.get(CACHE_CONTROL_HEADER) or None,
    )
