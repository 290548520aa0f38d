"""Runs the router: python -m services.router."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from meshserve.llm.v1 import llm_pb2, llm_pb2_grpc
from meshserve.llm.v2 import llm_pb2 as llm_v2_pb2
from meshserve.llm.v2 import llm_pb2_grpc as llm_v2_pb2_grpc
from services.auth.build import open_keys
from services.ratelimit.build import open_limits
from services.ratelimit.spares import Spares
from services.router.admission import Admission
from services.router.balancer import Balancer
from services.router.budget import GrpcTokenBudget
from services.router.cache import ResponseCache
from services.router.catalogue import Catalogue
from services.router.completions import Completions
from services.router.config import RouterSettings
from services.router.failover import RoutingPolicy
from services.router.fleet import Fleet
from services.router.limits import LocalTokenBudget
from services.router.openai_api import OpenAIApi
from services.router.openai_servicer import OpenAIServicer
from services.router.responses import ResponseStore
from services.router.servicer import Identify, LlmServicer
from services.router.usage import GrpcUsageSink
from services.runtime import redis_tls
from services.runtime.server import Runtime, serve
from services.runtime.watched import WatchedFile

log = logging.getLogger("services.router")

SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name
OPENAI_SERVICE = llm_v2_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name


def main() -> None:
    settings = RouterSettings()

    async def setup(rt: Runtime) -> None:
        catalogue = WatchedFile(Path(settings.catalogue), Catalogue.from_yaml, "catalogue")
        budget: LocalTokenBudget | GrpcTokenBudget | None = None
        if settings.limits_redis_url:
            limits = open_limits(
                settings.limits_redis_url,
                Path(settings.limits_rules),
                rt.tls,
                settings.limits_redis_timeout_seconds,
                Path(settings.limits_prices) if settings.limits_prices else None,
                settings.limits_settle_delay_seconds,
            )
            limits.follow(settings.limits_rules_poll_seconds)
            rt.warm_up_with(limits.ready)
            rt.on_shutdown(limits.close)
            spares = Spares(limits.limiter, settings.limits_spare_seconds) if settings.limits_spare_seconds else None
            budget = LocalTokenBudget(limits.limiter, spares=spares)
        elif settings.ratelimit:
            budget = GrpcTokenBudget(
                settings.ratelimit,
                settings.ratelimit_fail_open,
                files=rt.tls,
                requests_fail_open=settings.ratelimit_requests_fail_open,
            )
        if budget is None:
            log.warning(
                "no limits configured (MESHSERVE_ROUTER_LIMITS_REDIS_URL or MESHSERVE_ROUTER_RATELIMIT): "
                "generation's request and token limits are off"
            )
        usage = (
            GrpcUsageSink(
                settings.billing,
                Path(settings.usage_spool),
                replay_seconds=settings.usage_replay_seconds,
                files=rt.tls,
            )
            if settings.billing
            else None
        )
        if usage is None:
            log.warning("no billing service configured (MESHSERVE_ROUTER_BILLING): usage is not recorded")
        fleet = Fleet(
            lambda: {t for e in catalogue.current.entries() for t in e.targets()},
            on_change=lambda: completions.replicas_changed(),
            report_interval_ms=settings.load_report_ms,
            resolve_seconds=settings.resolve_seconds,
            files=rt.tls,
        )
        completions = Completions(
            lambda: catalogue.current,
            fleet,
            budget=budget,
            balancer=Balancer(settings.balance, settings.load_bound),
            admission=Admission(settings.queue_size, settings.queue_timeout_seconds),
            policy=RoutingPolicy(prefix_chars=settings.prefix_chars, failover_attempts=settings.failover_attempts),
            usage=usage,
        )
        keys = None
        if settings.auth_redis_url:
            keys = open_keys(
                settings.auth_redis_url,
                rt.tls,
                settings.auth_cache_entries,
                settings.auth_cache_max_age_seconds,
                settings.auth_outage_grace_seconds,
            )
            rt.warm_up_with(keys.ready)
            rt.on_shutdown(keys.close)
        identify = Identify(settings.require_caller, keys.authenticator if keys is not None else None)
        llm_pb2_grpc.add_LlmServiceServicer_to_server(LlmServicer(completions, identify), rt.server)

        def redis_client(url: str) -> Any:
            import redis.asyncio

            client = redis.asyncio.Redis.from_url(url, **redis_tls.options(url, rt.tls), socket_timeout=2.0)
            rt.on_shutdown(client.aclose)
            return client

        store = ResponseStore(None, settings.responses_ttl_seconds)
        if settings.responses_redis_url:
            store = ResponseStore(redis_client(settings.responses_redis_url), settings.responses_ttl_seconds)
        answers = None
        if settings.cache_redis_url:
            answers = ResponseCache(
                redis_client(settings.cache_redis_url),
                settings.cache_ttl_seconds,
                settings.cache_max_bytes,
                settings.cache_max_entry_bytes,
            )
        api = OpenAIApi(completions.pipeline, settings.reserve_on_guess, store, answers)
        openai = OpenAIServicer(api, identify)
        llm_v2_pb2_grpc.add_LlmServiceServicer_to_server(openai, rt.server)

        watcher = asyncio.create_task(catalogue.follow(settings.catalogue_poll_seconds))

        async def close() -> None:
            watcher.cancel()
            if budget is not None:
                await budget.close()
            await fleet.close()
            await completions.pipeline.providers.close()
            if usage is not None:
                await usage.close()

        if usage is not None:
            usage.start()

        async def replicas_in_rotation() -> None:
            # Ready only when a request for any catalogued model can be served: a router that said
            # SERVING before its replicas answered sent its first requests to 503s.
            waiting: list[str] = []
            while unready := completions.unready_models():
                if unready != waiting:
                    log.info("waiting for a replica in rotation", extra={"models": unready})
                    waiting = unready
                await asyncio.sleep(0.1)

        rt.warm_up_with(fleet.start)
        rt.warm_up_with(replicas_in_rotation)
        rt.on_shutdown(close)

    serve("router", settings, [SERVICE, OPENAI_SERVICE], setup)


if __name__ == "__main__":
    main()
