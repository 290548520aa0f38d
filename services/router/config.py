"""Router settings (env prefix MESHSERVE_ROUTER_)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.runtime.settings import ServiceSettings


class RouterSettings(ServiceSettings):
    """Settings of the router."""

    model_config = SettingsConfigDict(env_prefix="MESHSERVE_ROUTER_", extra="ignore")

    # Path of the model catalogue YAML (models, versions with weights, replica addresses).
    catalogue: str = "deploy/local/catalogue.yaml"
    # Seconds between checks of the catalogue file for changes.
    catalogue_poll_seconds: float = 2.0
    # Refuse calls without the identity headers the edge's auth check adds. Turn off only for a
    # router that trusted internal callers reach directly (never one behind a public edge).
    require_caller: bool = True
    # host:port of the rate-limit service's token budgets; empty turns token limits off for this router.
    ratelimit: str = ""
    # The rate-limit service unreachable: generate without a reservation (True) or refuse with 503 (False).
    # Match the rules' `failure_mode.tokens` (the local mesh and the Kubernetes render do).
    ratelimit_fail_open: bool = True
