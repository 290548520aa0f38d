"""Inference settings (env prefix MESHSERVE_INFERENCE_)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.runtime.settings import ServiceSettings


class InferenceSettings(ServiceSettings):
    """Settings of an inference replica."""

    model_config = SettingsConfigDict(env_prefix="MESHSERVE_INFERENCE_", extra="ignore")

    # Name of the model to serve: a folder in the model store.
    model: str = "smollm2-135m-instruct"
    # Folder of the model store (one HF folder per model name).
    model_store: str = "var/models"
    # Weights dtype: auto, bfloat16, float16 or float32.
    dtype: str = "auto"
    # Context length in tokens (prompt plus completion).
    max_model_len: int = 2048
    # Most requests the engine batches at once.
    max_num_seqs: int = 64
    # KV cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE); vLLM takes about 8 unset.
    cpu_kv_cache_gib: int = 1
    # Run vLLM's engine core inside this process (faster start, shares the event loop).
    in_process_engine: bool = False
    # Fraction of GPU memory vLLM may take (ignored on CPU).
    gpu_memory_utilization: float = 0.9
    # Folder for vLLM's caches and IPC sockets.
    cache_dir: str = "var/cache/vllm"
