"""`meshserve keys`: create, list, show, rotate and revoke API keys through the edge's admin API."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import grpc
import typer
from google.protobuf import json_format, message, timestamp_pb2
from rich.console import Console
from rich.table import Table

from meshserve.auth.v1 import auth_pb2, auth_pb2_grpc
from services.runtime import tls

app = typer.Typer(help="API keys (needs an admin key).", no_args_is_help=True)
out = Console(soft_wrap=True)
err = Console(stderr=True)

EDGE = typer.Option("127.0.0.1:8080", envvar="MESHSERVE_EDGE", help="Edge address (host:port).")
ADMIN_KEY = typer.Option(
    "", envvar="MESHSERVE_ADMIN_KEY", help="Admin key; default: the one `meshserve up` wrote to var/run."
)
CA = typer.Option(
    "", envvar="MESHSERVE_EDGE_CA", help="The CA of a TLS edge (`meshserve up --tls` prints it); empty: plain."
)
RPM = typer.Option(0, help="Requests per minute for this key (0: plan default).")
TPM = typer.Option(0, help="Tokens per minute for this key (0: plan default).")
BUDGET = typer.Option(
    "", help="Most the key may spend per period, in the price table's currency (empty: no budget of its own)."
)
BUDGET_PERIOD = typer.Option("month", help="When the budget starts again: day, month or none.")
JSON = typer.Option(False, "--json", help="Print the reply as JSON (proto field names) instead of a table.")
ADMIN_FILE = Path("var/run/admin-key.json")
_DURATION = re.compile(r"^(\d+)([smhd])$")


def parse_duration(text: str) -> float:
    """Seconds in '90s', '15m', '12h' or '30d'."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise typer.BadParameter(f"{text!r}: use a number and s, m, h or d, e.g. 30d")
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


Metadata = tuple[tuple[str, str], ...]


@contextmanager
def admin_channel(edge: str, admin_key: str, ca: str = "") -> Iterator[tuple[grpc.Channel, Metadata]]:
    """A channel to the edge (local or a cluster's) and the admin key's metadata; an RPC error exits with 1."""
    if not admin_key:
        if not ADMIN_FILE.exists():
            raise typer.BadParameter(
                "no admin key: pass --admin-key or set MESHSERVE_ADMIN_KEY", param_hint="admin-key"
            )
        admin_key = json.loads(ADMIN_FILE.read_text())["secret"]
    with tls.edge_channel(edge, Path(ca) if ca else None) as channel:
        try:
            yield channel, (("authorization", f"Bearer {admin_key}"),)
        except grpc.RpcError as exc:
            err.print(f"[red]{exc.code().name}[/]: {exc.details()}")
            raise typer.Exit(1) from exc


@contextmanager
def _admin(edge: str, admin_key: str, ca: str = "") -> Iterator[tuple[auth_pb2_grpc.AuthAdminServiceStub, Metadata]]:
    with admin_channel(edge, admin_key, ca) as (channel, auth):
        yield auth_pb2_grpc.AuthAdminServiceStub(channel), auth


def _when(ts: timestamp_pb2.Timestamp, present: bool) -> str:
    if not present:
        return "-"
    return datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%d %H:%M")


def show_json(reply: message.Message) -> None:
    """The reply as JSON on standard output: proto field names, every field, timestamps in RFC 3339."""
    print(json.dumps(json_format.MessageToDict(reply, preserving_proto_field_name=True), indent=2))


def show(reply: message.Message, as_json: bool, keys: list[auth_pb2.Key], *notes: str) -> None:
    """The reply as JSON (show_json), or keys as a table and the notes."""
    if as_json:
        show_json(reply)
        return
    out.print(_table(keys))
    for note in notes:
        out.print(note)


def _table(keys: list[auth_pb2.Key]) -> Table:
    table = Table("key id", "tenant", "label", "models", "admin", "budget", "secret", "created", "expires", "revoked")
    for k in keys:
        table.add_row(
            k.key_id,
            k.tenant,
            k.label,
            ", ".join(k.allowed_models) or "all",
            "yes" if k.admin else "",
            k.limits.budget,
            k.secret_prefix + "…",
            _when(k.created_at, k.HasField("created_at")),
            _when(k.expires_at, k.HasField("expires_at")),
            _when(k.revoked_at, k.HasField("revoked_at")),
        )
    return table


def _key_limits(rpm: int, tpm: int, budget: str, budget_period: str) -> auth_pb2.KeyLimits:
    return auth_pb2.KeyLimits(
        requests_per_minute=rpm, tokens_per_minute=tpm, budget=f"{budget}/{budget_period}" if budget else ""
    )


@app.command()
def create(
    tenant: str = typer.Option(..., help="Tenant that owns the key."),
    model: list[str] = typer.Option([], help="A model the key may use (repeat); none means all."),
    label: str = typer.Option("", help="A name for people."),
    admin: bool = typer.Option(False, help="Make an admin key."),
    expires_in: str = typer.Option("", help="Lifetime, e.g. 30d or 12h; empty: no expiry."),
    rpm: int = RPM,
    tpm: int = TPM,
    budget: str = BUDGET,
    budget_period: str = BUDGET_PERIOD,
    edge: str = EDGE,
    admin_key: str = ADMIN_KEY,
    ca: str = CA,
    as_json: bool = JSON,
) -> None:
    """Creates a key and prints its secret, the only time it is shown."""
    request = auth_pb2.CreateKeyRequest(
        tenant=tenant,
        label=label,
        allowed_models=model,
        admin=admin,
        limits=_key_limits(rpm, tpm, budget, budget_period),
    )
    if expires_in:
        request.expires_at.FromSeconds(int(time.time() + parse_duration(expires_in)))
    with _admin(edge, admin_key, ca) as (stub, auth):
        reply = stub.CreateKey(request, metadata=auth, timeout=10)
    show(reply, as_json, [reply.key], f"secret (shown once): [bold]{reply.secret}[/]")


@app.command("list")
def list_keys(
    tenant: str = typer.Option("", help="Only this tenant's keys."),
    all_keys: bool = typer.Option(False, "--all", help="Include revoked keys."),
    edge: str = EDGE,
    admin_key: str = ADMIN_KEY,
    ca: str = CA,
    as_json: bool = JSON,
) -> None:
    """Lists keys (never their secrets)."""
    with _admin(edge, admin_key, ca) as (stub, auth):
        reply = stub.ListKeys(
            auth_pb2.ListKeysRequest(tenant=tenant, include_revoked=all_keys), metadata=auth, timeout=10
        )
    show(reply, as_json, list(reply.keys))


@app.command()
def get(key_id: str, edge: str = EDGE, admin_key: str = ADMIN_KEY, ca: str = CA, as_json: bool = JSON) -> None:
    """Shows one key."""
    with _admin(edge, admin_key, ca) as (stub, auth):
        reply = stub.GetKey(auth_pb2.GetKeyRequest(key_id=key_id), metadata=auth, timeout=10)
    show(reply, as_json, [reply.key])


@app.command()
def rotate(
    key_id: str,
    grace: str = typer.Option("1h", help="How long the old secret keeps working, e.g. 10m; 0s stops it now."),
    edge: str = EDGE,
    admin_key: str = ADMIN_KEY,
    ca: str = CA,
    as_json: bool = JSON,
) -> None:
    """Issues a new secret; the old one works for the grace period."""
    with _admin(edge, admin_key, ca) as (stub, auth):
        reply = stub.RotateKey(
            auth_pb2.RotateKeyRequest(key_id=key_id, grace_seconds=int(parse_duration(grace))),
            metadata=auth,
            timeout=10,
        )
    show(
        reply,
        as_json,
        [reply.key],
        f"new secret (shown once): [bold]{reply.secret}[/]",
        f"the old secret stops at {_when(reply.old_secret_expires_at, True)} UTC",
    )


@app.command()
def revoke(key_id: str, edge: str = EDGE, admin_key: str = ADMIN_KEY, ca: str = CA, as_json: bool = JSON) -> None:
    """Revokes a key on every auth replica within a second."""
    with _admin(edge, admin_key, ca) as (stub, auth):
        reply = stub.RevokeKey(auth_pb2.RevokeKeyRequest(key_id=key_id), metadata=auth, timeout=10)
    show(reply, as_json, [reply.key])


@app.command()
def update(
    key_id: str,
    rpm: int = RPM,
    tpm: int = TPM,
    budget: str = BUDGET,
    budget_period: str = BUDGET_PERIOD,
    edge: str = EDGE,
    admin_key: str = ADMIN_KEY,
    ca: str = CA,
    as_json: bool = JSON,
) -> None:
    """Replaces a key's own limits (every one: what is left out goes back to the plan's, or to no budget)."""
    request = auth_pb2.UpdateKeyRequest(key_id=key_id, limits=_key_limits(rpm, tpm, budget, budget_period))
    with _admin(edge, admin_key, ca) as (stub, auth):
        reply = stub.UpdateKey(request, metadata=auth, timeout=10)
    show(reply, as_json, [reply.key])
