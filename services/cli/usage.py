"""`meshserve usage`: token usage and cost from the billing ledger, through the edge (local or a cluster's)."""

from __future__ import annotations

import time

import typer
from rich.table import Table

from meshserve.billing.v1 import billing_pb2, billing_pb2_grpc
from services.cli.keys import ADMIN_KEY, CA, EDGE, JSON, admin_channel, out, show_json

BUDGET_AMOUNTS = ("limit", "spent", "held", "remaining")
COLUMNS = (
    "tenant",
    "key",
    "model",
    "requests",
    "prompt tokens",
    "completion tokens",
    "written off",
    "cached",
    "cost",
)


def usage(
    hours: float = typer.Option(24, help="How far back, in hours."),
    tenant: str = typer.Option("", help="Only this tenant."),
    key: str = typer.Option("", help="Only this key id."),
    model: str = typer.Option("", help="Only this model."),
    edge: str = EDGE,
    admin_key: str = ADMIN_KEY,
    ca: str = CA,
    as_json: bool = JSON,
) -> None:
    """Token usage and cost per tenant, key and model, from the billing ledger, and the spend budgets drawn on
    (an admin key sees every tenant)."""
    request = billing_pb2.GetUsageRequest(tenant=tenant, key_id=key, model=model)
    request.start.FromSeconds(int(time.time() - hours * 3600))
    with admin_channel(edge, admin_key, ca) as (channel, auth):
        reply = billing_pb2_grpc.BillingServiceStub(channel).GetUsage(request, metadata=auth, timeout=10)
    if as_json:
        show_json(reply)
        return
    table = Table(title=f"usage over the last {hours:g} h ({reply.currency})")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("tenant", "key", "model") else "right")
    for line in reply.lines:
        table.add_row(
            line.tenant,
            line.key_id,
            line.model,
            f"{line.requests:,}",
            f"{line.prompt_tokens:,}",
            f"{line.completion_tokens:,}",
            f"{line.written_off_tokens:,}",
            f"{line.cached:,}",
            line.cost,
        )
    out.print(table)
    if reply.budgets:
        budgets = Table(title=f"spend budgets ({reply.currency})")
        for column in ("tenant", "scope", "of", "period", "limit", "spent", "held", "remaining"):
            budgets.add_column(column, justify="right" if column in BUDGET_AMOUNTS else "left")
        for b in reply.budgets:
            budgets.add_row(b.tenant, b.scope, b.subject, b.period, b.limit, b.spent, b.held, b.remaining)
        out.print(budgets)
