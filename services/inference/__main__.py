"""Runs an inference replica: python -m services.inference."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from meshserve.inference.v1 import inference_pb2, inference_pb2_grpc
from services.inference.config import InferenceSettings
from services.inference.engine import Engine, EngineConfig
from services.inference.model_store import ModelStore
from services.inference.servicer import InferenceServicer
from services.runtime.server import Runtime, serve

SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def vllm_environment(settings: InferenceSettings) -> None:
    """vLLM reads these at import time; they are set here, once, from the settings."""
    cache = Path(settings.cache_dir).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kv_cache_gib))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_HOST_IP", settings.host if settings.host != "0.0.0.0" else "127.0.0.1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache))
    os.environ.setdefault("VLLM_RPC_BASE_PATH", str(cache))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if settings.in_process_engine else "1"


def main() -> None:
    settings = InferenceSettings()
    vllm_environment(settings)

    async def setup(rt: Runtime) -> None:
        servicer = InferenceServicer()
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, rt.server)
        config = EngineConfig(
            model_name=settings.model,
            model_dir=ModelStore(Path(settings.model_store)).path(settings.model),
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            gpu_memory_utilization=settings.gpu_memory_utilization,
        )

        async def load_and_warm_up() -> None:
            # Loading blocks for seconds to minutes: off the event loop, so health answers NOT_SERVING meanwhile.
            engine = await asyncio.to_thread(Engine.start, config)
            servicer.engine = engine
            await engine.warm_up()

        async def stop_engine() -> None:
            if servicer.engine is not None:
                servicer.engine.shutdown()

        rt.warm_up_with(load_and_warm_up)
        rt.on_shutdown(stop_engine)

    serve("inference", settings, [SERVICE], setup)


if __name__ == "__main__":
    main()
