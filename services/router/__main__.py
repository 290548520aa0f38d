"""Runs the router: python -m services.router."""

from __future__ import annotations

from pathlib import Path

from meshserve.llm.v1 import llm_pb2, llm_pb2_grpc
from services.router.catalogue import Catalogue
from services.router.completions import Completions
from services.router.config import RouterSettings
from services.router.replicas import ReplicaPool
from services.router.servicer import LlmServicer
from services.runtime.server import Runtime, serve

SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name


def main() -> None:
    settings = RouterSettings()

    async def setup(rt: Runtime) -> None:
        catalogue = Catalogue.from_yaml(Path(settings.catalogue))
        pool = ReplicaPool()
        llm_pb2_grpc.add_LlmServiceServicer_to_server(
            LlmServicer(Completions(catalogue, pool.get), settings.require_caller), rt.server
        )
        rt.on_shutdown(pool.close)

    serve("router", settings, [SERVICE], setup)


if __name__ == "__main__":
    main()
