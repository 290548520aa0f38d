"""Runs a billing replica: python -m services.billing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as redis

from meshserve.billing.v1 import billing_pb2, billing_pb2_grpc
from services.billing.config import BillingSettings
from services.billing.flush import flush_forever, flush_once
from services.billing.ledger import SqliteLedger
from services.billing.meter import Meter
from services.billing.prices import Prices
from services.billing.servicer import BillingServicer
from services.runtime.server import Runtime, serve
from services.runtime.watched import WatchedFile

SERVICE = billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name


def main() -> None:
    settings = BillingSettings()

    async def setup(rt: Runtime) -> None:
        prices = WatchedFile(Path(settings.prices), Prices.from_yaml, "price table")
        client = redis.Redis.from_url(settings.redis_url)
        meter = Meter(client, max_age_seconds=settings.max_age_days * 86400)
        ledger = SqliteLedger(Path(settings.ledger))
        billing_pb2_grpc.add_BillingServiceServicer_to_server(
            BillingServicer(meter, ledger, lambda: prices.current), rt.server
        )
        tasks: list[asyncio.Task[None]] = []

        async def ready() -> None:
            await client.ping()
            tasks.append(asyncio.create_task(prices.follow(settings.prices_poll_seconds)))
            tasks.append(
                asyncio.create_task(flush_forever(meter, ledger, lambda: prices.current, settings.flush_seconds))
            )

        async def close() -> None:
            for task in tasks:
                task.cancel()
            # What reached Redis reaches the ledger before the replica goes.
            await flush_once(meter, ledger, prices.current)
            ledger.close()
            await client.aclose()

        rt.warm_up_with(ready)
        rt.on_shutdown(close)

    serve("billing", settings, [SERVICE], setup)


if __name__ == "__main__":
    main()
