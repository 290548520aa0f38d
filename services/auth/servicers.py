"""The auth service's gRPC servicers: Envoy's ext_authz Check, and the key admin API."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2, status_pb2
from grpc import aio
from opentelemetry import trace

from meshserve.auth.v1 import auth_pb2, auth_pb2_grpc
from services.auth.authenticator import Authenticator
from services.auth.keys import ADMIN_PATH_PREFIX, API_KEY_HEADER, KeyRecord, authorization, validate_new_key
from services.auth.store import KeyStore
from services.ratelimit.budgets import Budget
from services.runtime.errors import DomainError, PermissionDenied, Unauthenticated, Unavailable
from services.runtime.identity import (
    ADMIN_HEADER,
    KEY_BUDGET_HEADER,
    KEY_ID_HEADER,
    KEY_RPM_HEADER,
    KEY_TPM_HEADER,
    MODELS_HEADER,
    NO_BUDGET,
    TENANT_HEADER,
)
from services.runtime.metadata import text_metadata

Context = aio.ServicerContext[Any, Any]


_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_DENIALS: dict[type[DomainError], int] = {
    Unauthenticated: code_pb2.UNAUTHENTICATED,
    PermissionDenied: code_pb2.PERMISSION_DENIED,
    Unavailable: code_pb2.UNAVAILABLE,
}


# Identity headers are set with OVERWRITE, so a client cannot supply its own.
def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE)


def _denied(exc: DomainError) -> external_auth_pb2.CheckResponse:
    code = _DENIALS.get(type(exc), code_pb2.UNAVAILABLE)
    status = exc.http_status if type(exc) in _DENIALS else Unavailable.http_status
    headers = [_header("www-authenticate", 'Bearer realm="meshserve"')] if status == 401 else []
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code, message=str(exc)),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=headers,
            # The edge wraps local replies in OpenAI's error shape (deploy/envoy/replies.py).
            body=str(exc),
        ),
    )


def _allowed(record: KeyRecord, admin_call: bool) -> external_auth_pb2.CheckResponse:
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[
                _header(TENANT_HEADER, record.tenant),
                _header(KEY_ID_HEADER, record.key_id),
                _header(ADMIN_HEADER, "true" if record.admin else "false"),
                _header(MODELS_HEADER, ",".join(record.allowed_models) or "*"),
                _header(KEY_RPM_HEADER, str(record.requests_per_minute)),
                _header(KEY_TPM_HEADER, str(record.tokens_per_minute)),
                _header(KEY_BUDGET_HEADER, record.budget or NO_BUDGET),
            ],
            # The admin API checks the credential itself; nothing else ever sees it.
            headers_to_remove=[] if admin_call else ["authorization", API_KEY_HEADER],
        ),
    )


class ExtAuthzServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """envoy.service.auth.v3.Authorization: every request through the edge is checked here."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    async def Check(self, request: external_auth_pb2.CheckRequest, context: Context) -> external_auth_pb2.CheckResponse:
        http = request.attributes.request.http
        admin_call = http.path.startswith(ADMIN_PATH_PREFIX)
        # The call's own span (the runtime's) is the auth check's: it gets the outcome.
        span = trace.get_current_span()
        try:
            record = await self._auth.check(authorization(http.headers), admin_call)
        except (Unauthenticated, PermissionDenied, Unavailable) as exc:
            span.set_attribute("meshserve.denied", type(exc).__name__)
            return _denied(exc)
        span.set_attribute("meshserve.tenant", record.tenant)
        return _allowed(record, admin_call)


def _ts(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def key_pb(record: KeyRecord) -> auth_pb2.Key:
    """A record as the API shows it: no secret and no secret hash."""
    return auth_pb2.Key(
        key_id=record.key_id,
        tenant=record.tenant,
        label=record.label,
        allowed_models=record.allowed_models,
        admin=record.admin,
        expires_at=_ts(record.expires_at),
        created_at=_ts(record.created_at),
        revoked_at=_ts(record.revoked_at),
        limits=auth_pb2.KeyLimits(
            requests_per_minute=record.requests_per_minute,
            tokens_per_minute=record.tokens_per_minute,
            budget=record.budget,
        ),
        secret_prefix=record.secret_prefix,
    )


def _limits(limits: auth_pb2.KeyLimits) -> dict[str, Any]:
    """A key's own limits as its record keeps them; a budget in its canonical form, refused when it does not
    parse."""
    return {
        "requests_per_minute": limits.requests_per_minute,
        "tokens_per_minute": limits.tokens_per_minute,
        "budget": str(Budget.parse(limits.budget)) if limits.budget else "",
    }


class AdminServicer(auth_pb2_grpc.AuthAdminServiceServicer):
    """meshserve.auth.v1.AuthAdminService; every call needs an admin key."""

    def __init__(self, authenticator: Authenticator, store: KeyStore) -> None:
        self._auth = authenticator
        self._store = store

    async def _require_admin(self, context: Context) -> None:
        metadata = text_metadata(context)
        await self._auth.check(metadata.get("authorization"), admin_call=True)

    async def CreateKey(self, request: auth_pb2.CreateKeyRequest, context: Context) -> auth_pb2.CreateKeyResponse:
        await self._require_admin(context)
        expires_at = request.expires_at.ToNanoseconds() / 1e9 if request.HasField("expires_at") else None
        validate_new_key(request.tenant, expires_at, time.time())
        template = KeyRecord(
            key_id="",
            tenant=request.tenant,
            label=request.label,
            allowed_models=tuple(request.allowed_models),
            admin=request.admin,
            expires_at=expires_at,
            **_limits(request.limits),
        )
        record, secret = await self._store.create(template)
        return auth_pb2.CreateKeyResponse(key=key_pb(record), secret=secret)

    async def ListKeys(self, request: auth_pb2.ListKeysRequest, context: Context) -> auth_pb2.ListKeysResponse:
        await self._require_admin(context)
        records = await self._store.list(request.tenant, request.include_revoked)
        return auth_pb2.ListKeysResponse(keys=[key_pb(r) for r in records])

    async def GetKey(self, request: auth_pb2.GetKeyRequest, context: Context) -> auth_pb2.GetKeyResponse:
        await self._require_admin(context)
        return auth_pb2.GetKeyResponse(key=key_pb(await self._store.get(request.key_id)))

    async def RotateKey(self, request: auth_pb2.RotateKeyRequest, context: Context) -> auth_pb2.RotateKeyResponse:
        await self._require_admin(context)
        record, secret, not_after = await self._store.rotate(request.key_id, request.grace_seconds)
        return auth_pb2.RotateKeyResponse(key=key_pb(record), secret=secret, old_secret_expires_at=_ts(not_after))

    async def RevokeKey(self, request: auth_pb2.RevokeKeyRequest, context: Context) -> auth_pb2.RevokeKeyResponse:
        await self._require_admin(context)
        return auth_pb2.RevokeKeyResponse(key=key_pb(await self._store.revoke(request.key_id)))

    async def UpdateKey(self, request: auth_pb2.UpdateKeyRequest, context: Context) -> auth_pb2.UpdateKeyResponse:
        await self._require_admin(context)
        limits = _limits(request.limits)
        record = await self._store.update(request.key_id, lambda old: replace(old, **limits))
        return auth_pb2.UpdateKeyResponse(key=key_pb(record))
