"""Runs the router: python -m services.router."""

from __future__ import annotations

import asyncio
from pathlib import Path

from meshserve.llm.v1 import llm_pb2, llm_pb2_grpc
from services.router.catalogue import CatalogueFile
from services.router.completions import Completions
from services.router.config import RouterSettings
from services.router.replicas import ReplicaPool
from services.router.servicer import LlmServicer
from services.runtime.server import Runtime, serve

SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name


def main() -> None:
    settings = RouterSettings()

    async def setup(rt: Runtime) -> None:
        catalogue = CatalogueFile(Path(settings.catalogue))
        pool = ReplicaPool()
        llm_pb2_grpc.add_LlmServiceServicer_to_server(
            LlmServicer(Completions(lambda: catalogue.current, pool.get), settings.require_caller), rt.server
        )

        async def follow_catalogue() -> None:
            while True:
                await asyncio.sleep(settings.catalogue_poll_seconds)
                catalogue.refresh()

        watcher = asyncio.create_task(follow_catalogue())

        async def close() -> None:
            watcher.cancel()
            await pool.close()

        rt.on_shutdown(close)

    serve("router", settings, [SERVICE], setup)


if __name__ == "__main__":
    main()
