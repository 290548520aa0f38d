"""Router settings (env prefix MESHSERVE_ROUTER_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.router.balancer import Strategy
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
    # The Redis of the auth service's key store (its MESHSERVE_AUTH_REDIS_URL): set, the router checks the API key
    # of every generation call itself, from an in-process cache of the store that its change channel keeps
    # correct, and the edge must skip its auth check on generation's routes (EdgeConfig.router_checks_keys;
    # the local mesh and the Kubernetes render pair them). Empty: the edge's auth check identifies every call.
    auth_redis_url: str = ""
    # Most keys in that cache, and seconds a cached key is trusted without hearing of a change (a safety net).
    auth_cache_entries: int = 100_000
    auth_cache_max_age_seconds: float = 60.0
    # Seconds into a key store outage that keys checked before it still pass (the auth service's setting).
    auth_outage_grace_seconds: float = 60.0
    # host:port of the rate-limit service; empty turns token limits, and generation's request limits (the
    # router counts those; the edge checks the other routes'), off for this router.
    ratelimit: str = ""
    # The rate-limit service unreachable: generate without a reservation (True) or refuse with 503 (False).
    # Match the rules' `failure_mode.tokens` (the local mesh and the Kubernetes render do).
    ratelimit_fail_open: bool = True
    # The same for counting a generation against its request limits: match the rules' `failure_mode.requests`.
    ratelimit_requests_fail_open: bool = True
    # The Redis of the rate-limit service (its MESHSERVE_RATELIMIT_REDIS_URL): set, the router decides
    # generation's request and token limits itself, with the service's limiter on the same Redis and rules
    # (no call to the service on the path; failure modes are the rules'), and MESHSERVE_ROUTER_RATELIMIT
    # is not used.
    limits_redis_url: str = ""
    # The rate-limit rules file (the service's MESHSERVE_RATELIMIT_RULES), followed as it changes.
    limits_rules: str = "deploy/local/ratelimits.yaml"
    limits_rules_poll_seconds: float = 2.0
    # The price table that prices spend budgets (billing's MESHSERVE_BILLING_PRICES); required where budgets are.
    limits_prices: str = ""
    # Seconds a Redis call may take before the decision follows the failure mode. Longer than the service's
    # 0.25: the router's event loop also relays every stream and checks every key, and a reply that came in
    # time but waited for a busy loop reads as a timeout. Measured on 2 cores, the router at nice 10 beside a
    # busy engine: 64 clients chatting at once failed a decision open at 0.25 s, and 64 with spend budgets
    # stalled the loop 1.4 s, failing decisions closed at 1 s (503s).
    limits_redis_timeout_seconds: float = 3.0
    # Seconds a finished request's settlement may wait to go to Redis with others, in one pipeline, and with the
    # next decision (services/ratelimit/scripts.py); 0 sends each alone. Its reservation counts in full until
    # then. Waiting 20 ms took ~0.37 ms of mesh CPU off each unary request at concurrency 1 (side by side with 0).
    limits_settle_delay_seconds: float = Field(default=0.02, ge=0.0, le=1.0)
    # The longest a spare admission lives (services/ratelimit/spares.py): the decision of a busy key's next
    # request, made before it comes, stamped ahead by this (at most a twentieth of the shortest window it counts
    # in) so that limits stay exact; 0 makes none, and every request waits for its own decision.
    limits_spare_seconds: float = Field(default=0.05, ge=0.0, le=1.0)
    # The Redis where the Responses API keeps stored responses (store: true, previous_response_id, GET
    # /v1/responses/{id}), per tenant; empty keeps none (previous_response_id is then refused with a 400).
    responses_redis_url: str = ""
    # How long a stored response stays readable (OpenAI keeps them 30 days; a day bounds Redis memory).
    responses_ttl_seconds: int = 86_400
    # The Redis of the response cache (deterministic requests answered again from it, for models whose
    # catalogue entry says `cache: tenant` or `shared`); empty keeps no cache.
    cache_redis_url: str = ""
    # How long a cached answer is served, the most bytes the cache holds (least recently used answers go
    # first), and the largest answer it keeps.
    cache_ttl_seconds: int = 3600
    cache_max_bytes: int = 64 * 1024 * 1024
    cache_max_entry_bytes: int = 1024 * 1024
    # Hold tokens for a guess in the first reservation, while the replica renders the prompt (estimates.py),
    # instead of reserving them after: no call to the rate-limit service waits on the rendering.
    reserve_on_guess: bool = True
    # host:port of the billing service; empty turns usage recording off for this router.
    billing: str = ""
    # Folder where usage batches wait while billing is unreachable; replayed when it answers again.
    usage_spool: str = "var/spool/usage"
    # Seconds between attempts to deliver spooled usage.
    usage_replay_seconds: float = 2.0
    # How requests spread over a version's replicas: affinity (least load, but a shared prompt prefix or
    # session stays on one replica within the load bound), least_load, or round_robin.
    balance: Strategy = Strategy.AFFINITY
    # An affine replica may take up to this many times its fair share of the load before requests spill.
    load_bound: float = 1.25
    # Prompts at least this many characters long are routed by that prefix.
    prefix_chars: int = 512
    # Requests that may wait per model version once every replica slot is taken; beyond it, 429 at once.
    queue_size: int = 256
    # Seconds a queued request waits for a slot before a 429.
    queue_timeout_seconds: float = 30.0
    # Replicas tried for one request that fail before the first token.
    failover_attempts: int = 3
    # Milliseconds between the load reports each replica streams to the router.
    load_report_ms: int = 250
    # Seconds between DNS resolutions of dns:/// replica targets.
    resolve_seconds: float = 5.0
