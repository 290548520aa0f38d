"""Auth settings (env prefix MESHSERVE_AUTH_)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.runtime.settings import ServiceSettings


class AuthSettings(ServiceSettings):
    """Settings of an auth replica."""

    model_config = SettingsConfigDict(env_prefix="MESHSERVE_AUTH_", extra="ignore")

    # Redis holding the keys (shared by every auth replica).
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Most secrets held in the in-process cache.
    cache_entries: int = 100_000
    # Seconds a cached key is trusted without hearing of a change (a safety net; changes arrive at once).
    cache_max_age_seconds: float = 60.0
    # Seconds into a Redis outage that keys checked before it still pass from the cache (0: refuse at once).
    # The trade-off: a key revoked during the outage keeps working until Redis is back or this runs out.
    outage_grace_seconds: float = 60.0
    # If set and no valid admin key is stored there, one is created and its secret written here (mode 0600).
    bootstrap_admin_file: str = ""
    # If set (from a Kubernetes Secret), an admin key with this secret is created unless it exists.
    bootstrap_admin_secret: str = ""
