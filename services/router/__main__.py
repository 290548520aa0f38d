"""Runs the router: python -m services.router."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from meshserve.llm.v1 import llm_pb2, llm_pb2_grpc
from services.router.budget import GrpcTokenBudget
from services.router.catalogue import Catalogue
from services.router.completions import Completions
from services.router.config import RouterSettings
from services.router.replicas import ReplicaPool
from services.router.servicer import LlmServicer
from services.runtime.server import Runtime, serve
from services.runtime.watched import WatchedFile

log = logging.getLogger("services.router")

SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name


def main() -> None:
    settings = RouterSettings()

    async def setup(rt: Runtime) -> None:
        catalogue = WatchedFile(Path(settings.catalogue), Catalogue.from_yaml, "catalogue")
        pool = ReplicaPool()
        budget = GrpcTokenBudget(settings.ratelimit, settings.ratelimit_fail_open) if settings.ratelimit else None
        if budget is None:
            log.warning("no rate-limit service configured (MESHSERVE_ROUTER_RATELIMIT): token limits are off")
        completions = Completions(lambda: catalogue.current, pool.get, budget=budget)
        llm_pb2_grpc.add_LlmServiceServicer_to_server(LlmServicer(completions, settings.require_caller), rt.server)

        watcher = asyncio.create_task(catalogue.follow(settings.catalogue_poll_seconds))

        async def close() -> None:
            watcher.cancel()
            if budget is not None:
                await budget.close()
            await pool.close()

        rt.on_shutdown(close)

    serve("router", settings, [SERVICE], setup)


if __name__ == "__main__":
    main()
