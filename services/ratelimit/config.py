"""Rate-limit settings (env prefix MESHSERVE_RATELIMIT_)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.runtime.settings import ServiceSettings


class RateLimitSettings(ServiceSettings):
    """Settings of a rate-limit replica."""

    model_config = SettingsConfigDict(env_prefix="MESHSERVE_RATELIMIT_", extra="ignore")

    # Redis holding the windows (shared by every replica).
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The rules YAML: plans, tenants on plans, failure modes. Reloaded when it changes.
    rules: str = "deploy/local/ratelimits.yaml"
    rules_poll_seconds: float = 2.0
    # The price table YAML (billing's) that prices spend budgets; without it a request a budget applies to is
    # refused (503), never let through unbudgeted.
    prices: str = ""
    # The domain Envoy's rate-limit filter sends.
    domain: str = "meshserve"
    # Seconds a Redis call may take before the decision follows the failure mode.
    redis_timeout_seconds: float = 0.25
