"""Runs a billing replica: python -m services.billing."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import redis.asyncio as redis

from meshserve.billing.v1 import billing_pb2, billing_pb2_grpc
from services.billing.config import BillingSettings
from services.billing.flush import flush_forever, flush_once
from services.billing.ledger import open_ledger
from services.billing.meter import Meter
from services.billing.prices import Prices
from services.billing.servicer import BillingServicer
from services.billing.webhook import WebhookSink
from services.runtime import redis_tls
from services.runtime.server import Runtime, serve
from services.runtime.watched import WatchedFile

log = logging.getLogger("services.billing")
SERVICE = billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name


def main() -> None:
    settings = BillingSettings()

    async def setup(rt: Runtime) -> None:
        prices = WatchedFile(Path(settings.prices), Prices.from_yaml, "price table")
        client = redis.Redis.from_url(settings.redis_url, **redis_tls.options(settings.redis_url, rt.tls))
        meter = Meter(client, max_age_seconds=settings.max_age_days * 86400, prices=lambda: prices.current)
        ledger = open_ledger(settings.ledger, settings.ledger_dsn)
        sink = (
            WebhookSink(
                ledger,
                settings.webhook_url,
                settings.webhook_secret,
                batch_size=settings.webhook_batch,
                timeout_seconds=settings.webhook_timeout_seconds,
                backoff_seconds=settings.webhook_backoff_seconds,
            )
            if settings.webhook_url
            else None
        )
        if sink is None:
            log.warning("no payment-provider webhook configured (MESHSERVE_BILLING_WEBHOOK_URL): meter events wait")
        billing_pb2_grpc.add_BillingServiceServicer_to_server(
            BillingServicer(meter, ledger, lambda: prices.current, client), rt.server
        )
        tasks: list[asyncio.Task[None]] = []

        async def ready() -> None:
            await redis_tls.answering(client)
            tasks.append(asyncio.create_task(prices.follow(settings.prices_poll_seconds)))
            tasks.append(
                asyncio.create_task(flush_forever(meter, ledger, lambda: prices.current, settings.flush_seconds))
            )
            if sink is not None:
                tasks.append(asyncio.create_task(sink.run_forever(settings.webhook_poll_seconds)))

        async def close() -> None:
            for task in tasks:
                task.cancel()
            # What reached Redis reaches the ledger before the replica goes.
            await flush_once(meter, ledger, prices.current)
            if sink is not None:
                await sink.close()
            ledger.close()
            await client.aclose()

        rt.warm_up_with(ready)
        rt.on_shutdown(close)

    serve("billing", settings, [SERVICE], setup)


if __name__ == "__main__":
    main()
