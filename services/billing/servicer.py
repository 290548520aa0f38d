"""The billing servicer: protobuf in, meter and ledger calls, protobuf out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from grpc import aio
from opentelemetry.trace import StatusCode
from redis.asyncio import Redis
from redis.exceptions import RedisError

from meshserve.billing.v1 import billing_pb2, billing_pb2_grpc
from services.billing.ledger import Ledger
from services.billing.meter import HOUR, Meter, Usage
from services.billing.prices import Prices
from services.ratelimit.budgets import money
from services.ratelimit.rules import Rules
from services.ratelimit.spend import budget_states
from services.runtime import tracing
from services.runtime.errors import InvalidArgument, PermissionDenied, Unavailable
from services.runtime.identity import ADMIN_HEADER, KEY_ID_HEADER, TENANT_HEADER
from services.runtime.metadata import text_metadata

Context = aio.ServicerContext[Any, Any]

OUTCOMES = {
    billing_pb2.OUTCOME_COMPLETED: "completed",
    billing_pb2.OUTCOME_CANCELLED: "cancelled",
    billing_pb2.OUTCOME_FAILED: "failed",
    billing_pb2.OUTCOME_CACHED: "cached",
}


def tenant_in_scope(requested: str, metadata: dict[str, str]) -> str:
    """The tenant a usage query may read. Through the edge, an ordinary key reads its own tenant only;
    an admin key, or an internal caller inside the mesh (no identity headers), may read any."""
    key_id = metadata.get(KEY_ID_HEADER, "")
    if not key_id or metadata.get(ADMIN_HEADER) == "true":
        return requested
    own = metadata.get(TENANT_HEADER, "")
    if requested and requested != own:
        raise PermissionDenied(f"API key {key_id} may read the usage of its own tenant only")
    return own


def usage_of(r: billing_pb2.UsageRecord) -> Usage:
    if r.outcome not in OUTCOMES:
        raise InvalidArgument(f"record {r.request_id}: outcome is required")
    return Usage(
        request_id=r.request_id,
        tenant=r.tenant,
        key_id=r.key_id,
        model=r.model,
        version=r.version,
        prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens,
        written_off_tokens=r.written_off_tokens,
        outcome=OUTCOMES[r.outcome],
        finished_at=r.finished_at.ToMicroseconds() / 1e6,
        queue_seconds=r.queue_seconds,
        ttft_seconds=r.ttft_seconds,
        total_seconds=r.total_seconds,
    )


class BillingServicer(billing_pb2_grpc.BillingServiceServicer):
    """meshserve.billing.v1.BillingService over a Meter and a ledger."""

    def __init__(self, meter: Meter, ledger: Ledger, prices: Any, redis: Redis | None = None) -> None:
        self._meter = meter
        self._ledger = ledger
        self._prices = prices
        # The spend budgets' Redis (the rate limiter's): their state is shown beside the usage.
        self._redis = redis

    async def RecordUsage(
        self, request_iterator: AsyncIterator[billing_pb2.RecordUsageRequest], context: Context
    ) -> billing_pb2.RecordUsageResponse:
        accepted = duplicates = 0
        async for batch in request_iterator:
            # Each traced request's record gets a span in that request's trace (batches mix requests).
            spans = [
                tracing.start_span("billing.record_usage", {"meshserve.request_id": r.request_id}, r.traceparent)
                for r in batch.records
                if r.traceparent
            ]
            try:
                a, d = await self._meter.record([usage_of(r) for r in batch.records])
            except (RedisError, OSError) as exc:
                for span in spans:
                    span.set_status(StatusCode.ERROR, "Redis unavailable")
                # The sender keeps the batch (spools it) and sends it again; counting is idempotent.
                raise Unavailable(f"usage cannot be recorded right now (Redis: {exc})") from exc
            finally:
                for span in spans:
                    span.end()
            accepted, duplicates = accepted + a, duplicates + d
        return billing_pb2.RecordUsageResponse(accepted=accepted, duplicates=duplicates)

    async def _budgets(self, tenants: list[str]) -> list[billing_pb2.BudgetLine]:
        if self._redis is None:
            return []
        out = []
        for tenant in tenants:
            try:
                states = await budget_states(self._redis, Rules.budget_index_key(tenant))
            except (RedisError, OSError) as exc:
                raise Unavailable(f"spend budgets cannot be read right now (Redis: {exc})") from exc
            out += [
                billing_pb2.BudgetLine(
                    tenant=tenant,
                    scope=s.scope,
                    subject=s.subject,
                    period=s.period,
                    **{name: str(money(getattr(s, name))) for name in ("limit", "spent", "held", "remaining")},
                )
                for s in states
            ]
        return out

    async def GetUsage(self, request: billing_pb2.GetUsageRequest, context: Context) -> billing_pb2.GetUsageResponse:
        start = int(request.start.seconds) // HOUR * HOUR
        end = int(request.end.seconds) if request.HasField("end") else int(time.time()) + 1
        if end <= start:
            raise InvalidArgument("end: must be after start")
        metadata = text_metadata(context)
        tenant = tenant_in_scope(request.tenant, metadata)
        lines = await asyncio.to_thread(self._ledger.usage, start, end, tenant, request.key_id, request.model)
        prices: Prices = self._prices()
        tenants = [tenant] if tenant is not None else sorted({line.tenant for line in lines})
        return billing_pb2.GetUsageResponse(
            budgets=await self._budgets(tenants),
            currency=prices.currency,
            lines=[
                billing_pb2.UsageLine(
                    tenant=line.tenant,
                    key_id=line.key_id,
                    model=line.model,
                    requests=line.requests,
                    prompt_tokens=line.prompt_tokens,
                    completion_tokens=line.completion_tokens,
                    written_off_tokens=line.written_off_tokens,
                    cached=line.cached,
                    cached_prompt_tokens=line.cached_prompt_tokens,
                    cached_completion_tokens=line.cached_completion_tokens,
                    cost=str(line.cost),
                )
                for line in lines
            ],
        )
