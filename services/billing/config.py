"""Billing settings (env prefix MESHSERVE_BILLING_)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.runtime.settings import ServiceSettings


class BillingSettings(ServiceSettings):
    """Settings of a billing replica."""

    model_config = SettingsConfigDict(env_prefix="MESHSERVE_BILLING_", extra="ignore")

    # Redis holding the hourly aggregates and the per-request markers.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The SQLite ledger file, used unless ledger_dsn names a PostgreSQL database.
    ledger: str = "var/billing/ledger.sqlite"
    # A PostgreSQL DSN (postgresql://user:password@host:5432/db); set it to keep the ledger there.
    ledger_dsn: str = ""
    # The price table YAML; reloaded when it changes.
    prices: str = "deploy/local/prices.yaml"
    prices_poll_seconds: float = 2.0
    # Seconds between flushes of changed aggregates into the ledger.
    flush_seconds: float = 1.0
    # Records older than this many days are refused (their request markers would be gone).
    max_age_days: int = 7
    # The payment provider's meter-event webhook; empty: events stay in the ledger's outbox, unsent.
    webhook_url: str = ""
    # Signs each webhook request (HMAC-SHA256, header meshserve-signature) when set.
    webhook_secret: str = ""
    webhook_batch: int = 100
    webhook_poll_seconds: float = 1.0
    webhook_timeout_seconds: float = 10.0
    # Backoff while the webhook fails: from the first to the second, doubling.
    webhook_backoff_seconds: tuple[float, float] = (0.5, 60.0)
