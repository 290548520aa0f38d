"""Runs an inference replica: python -m services.inference."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from prometheus_client import REGISTRY

from meshserve.inference.v1 import inference_pb2, inference_pb2_grpc
from services.inference import schemes
from services.inference.config import InferenceSettings
from services.inference.engine import Engine, EngineConfig
from services.inference.metrics import LoadCollector
from services.inference.model_store import ModelStore
from services.inference.openai_serving import ServingLayer
from services.inference.servicer import InferenceServicer
from services.runtime.errors import DomainError
from services.runtime.server import Runtime, serve

SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def vllm_environment(settings: InferenceSettings) -> None:
    """vLLM reads its settings at import time: exported here, once, before it is imported."""
    Path(settings.cache_dir).mkdir(parents=True, exist_ok=True)
    settings.ipc_dir().mkdir(mode=0o700, exist_ok=True)
    for key, value in settings.vllm_env().items():
        os.environ.setdefault(key, value)


def main() -> None:
    settings = InferenceSettings()
    try:
        model_dir = ModelStore(Path(settings.model_store)).path(settings.model)
        # Refused here, with the reason, where the engine cannot run the scheme: not a stack trace at load.
        scheme = schemes.check(model_dir, settings.quantization, settings.kv_cache_dtype)
        dtype = schemes.weights_dtype(model_dir, settings.dtype, settings.quantization)
    except DomainError as refused:
        sys.exit(f"inference: {refused}")
    vllm_environment(settings)

    async def setup(rt: Runtime) -> None:
        servicer = InferenceServicer(rt.draining, settings.pool, scheme)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, rt.server)
        config = EngineConfig(
            model_name=settings.served_name or settings.model,
            model_dir=model_dir,
            dtype=dtype,
            quantization=settings.quantization,
            kv_cache_dtype=settings.kv_cache_dtype,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            stream_interval=settings.stream_interval,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            custom_ops=tuple(settings.custom_ops_list()),
        )

        async def load_and_warm_up() -> None:
            # Loading blocks for seconds to minutes: off the event loop, so health answers NOT_SERVING meanwhile.
            engine = await asyncio.to_thread(Engine.start, config)
            await engine.warm_up()
            servicer.serving = await ServingLayer.start(engine, settings.serve_flags)
            servicer.engine = engine

        async def stop_engine() -> None:
            if servicer.engine is not None:
                servicer.engine.shutdown()

        REGISTRY.register(
            LoadCollector(
                settings.served_name or settings.model,
                lambda: servicer.engine.load() if servicer.engine is not None else None,
            )
        )
        rt.warm_up_with(load_and_warm_up)
        rt.on_shutdown(stop_engine)

    serve("inference", settings, [SERVICE], setup)


if __name__ == "__main__":
    main()
