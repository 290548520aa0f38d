"""Billing settings (env prefix MESHSERVE_BILLING_)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.runtime.settings import ServiceSettings


class BillingSettings(ServiceSettings):
    """Settings of a billing replica."""

    model_config = SettingsConfigDict(env_prefix="MESHSERVE_BILLING_", extra="ignore")

    # Redis holding the hourly aggregates and the per-request markers.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The SQLite ledger file.
    ledger: str = "var/billing/ledger.sqlite"
    # The price table YAML; reloaded when it changes.
    prices: str = "deploy/local/prices.yaml"
    prices_poll_seconds: float = 2.0
    # Seconds between flushes of changed aggregates into the ledger.
    flush_seconds: float = 1.0
    # Records older than this many days are refused (their request markers would be gone).
    max_age_days: int = 7
