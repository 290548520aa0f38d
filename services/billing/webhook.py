"""The payment-provider sink: the ledger's meter events, posted in batches to an HTTP webhook.

Shaped like Stripe's meter events: each event has an `identifier` that stays the same across retries,
so a provider that saw a batch whose answer was lost drops the repeats. A batch is marked sent only
after a 2xx answer; anything else (an error status, a timeout, a refused connection) leaves it pending
and the sink tries again after a backoff that doubles up to a ceiling. Nothing is ever dropped: an
event the provider refuses for good (a 4xx) stays pending, counted and logged, until someone looks.
With a secret, every request is signed: `meshserve-signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">`.
Imports no gRPC.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Sequence

import httpx
from prometheus_client import Counter, Gauge

from services.billing.ledger import Ledger, MeterEvent

log = logging.getLogger(__name__)

EVENT_NAME = "meshserve.tokens"
SIGNATURE_HEADER = "meshserve-signature"

EVENTS = Counter("meshserve_billing_webhook_events_total", "Meter events posted to the webhook, by result.", ["result"])
PENDING = Gauge("meshserve_billing_webhook_pending_events", "Meter events waiting for the webhook (up to one batch).")
LAG = Gauge("meshserve_billing_webhook_lag_seconds", "Age of the oldest meter event the webhook has not acknowledged.")


class WebhookError(Exception):
    """The webhook did not take a batch; it stays pending."""


def event_json(e: MeterEvent) -> dict[str, object]:
    """One meter event as the webhook receives it; values are strings, as in Stripe's payloads."""
    return {
        "identifier": e.identifier,
        "event_name": EVENT_NAME,
        "timestamp": e.hour,
        "payload": {
            "customer": e.tenant,
            "key_id": e.key_id,
            "model": e.model,
            "requests": str(e.requests),
            "prompt_tokens": str(e.prompt_tokens),
            "completion_tokens": str(e.completion_tokens),
            "cost": str(e.cost),
            "currency": e.currency,
        },
    }


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class WebhookSink:
    """Drains the ledger's meter events to one webhook URL."""

    def __init__(
        self,
        ledger: Ledger,
        url: str,
        secret: str = "",
        batch_size: int = 100,
        timeout_seconds: float = 10.0,
        backoff_seconds: tuple[float, float] = (0.5, 60.0),
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._ledger = ledger
        self._url = url
        self._secret = secret
        self._batch_size = batch_size
        self._backoff = backoff_seconds
        self._client = httpx.AsyncClient(timeout=timeout_seconds, transport=transport)

    async def send_once(self) -> int:
        """Posts one batch of pending events; returns how many the webhook took (0: none pending)."""
        events = await asyncio.to_thread(self._ledger.pending_events, self._batch_size)
        PENDING.set(len(events))
        LAG.set(time.time() - events[0].created_at if events else 0)
        if not events:
            return 0
        await self._post(events)
        await asyncio.to_thread(self._ledger.mark_sent, [e.seq for e in events])
        EVENTS.labels("sent").inc(len(events))
        return len(events)

    async def _post(self, events: Sequence[MeterEvent]) -> None:
        body = json.dumps({"object": "list", "data": [event_json(e) for e in events]}, separators=(",", ":")).encode()
        batch_key = hashlib.blake2b("\n".join(e.identifier for e in events).encode(), digest_size=16).hexdigest()
        headers = {"content-type": "application/json", "idempotency-key": batch_key}
        if self._secret:
            headers[SIGNATURE_HEADER] = sign(self._secret, int(time.time()), body)
        try:
            response = await self._client.post(self._url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            EVENTS.labels("failed").inc(len(events))
            raise WebhookError(f"webhook unreachable: {type(exc).__name__}: {exc}") from exc
        if not response.is_success:
            result = (
                "rejected" if 400 <= response.status_code < 500 and response.status_code not in (408, 429) else "failed"
            )
            EVENTS.labels(result).inc(len(events))
            raise WebhookError(f"webhook answered {response.status_code} ({result})")

    async def run_forever(self, poll_seconds: float) -> None:
        """Sends while events are pending, polls when none are, and backs off while the webhook fails."""
        delay = self._backoff[0]
        while True:
            try:
                sent = await self.send_once()
                delay = self._backoff[0]
            except WebhookError as exc:
                log.warning("meter events not delivered; retrying", extra={"error": str(exc), "retry_in": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            except Exception:
                log.exception("meter events could not be read from the ledger; retrying")
                sent = 0
            if sent < self._batch_size:
                await asyncio.sleep(poll_seconds)

    async def close(self) -> None:
        await self._client.aclose()
