"""Inference settings (env prefix MESHSERVE_INFERENCE_)."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.runtime.settings import ServiceSettings


class InferenceSettings(ServiceSettings):
    """Settings of an inference replica."""

    model_config = SettingsConfigDict(env_prefix="MESHSERVE_INFERENCE_", extra="ignore")

    # The capacity pool this replica runs in (for example spot or on-demand): the router weighs its load by the
    # catalogue's weight for the pool (pool_weights). Empty: none.
    pool: str = ""
    # Name of the model to serve: a folder in the model store.
    model: str = "smollm2-135m-instruct"
    # Model id clients and the router use; empty means the store name (a canary may serve a newer
    # checkpoint under the public id of the old one).
    served_name: str = ""
    # Folder of the model store (one HF folder per model name).
    model_store: str = "var/models"
    # Weights dtype: auto, bfloat16, float16 or float32.
    dtype: str = "auto"
    # vLLM's quantization method; empty: the checkpoint's own (vLLM reads it from config.json), or none.
    # Checked before loading: a method the engine here cannot run is refused with the reason.
    quantization: str = ""
    # KV cache dtype: auto (the model's dtype) or fp8 (fp8_e4m3, fp8_e5m2): half the memory per token on
    # GPUs; on the CPU engine it needs AVX-512 or AMX.
    kv_cache_dtype: str = "auto"
    # Context length in tokens (prompt plus completion); 0 takes the model's own (an embedding model's 512).
    max_model_len: int = 2048
    # Most requests the engine batches at once.
    max_num_seqs: int = 64
    # Tokens per streamed event (vLLM's --stream-interval): 1 sends every token as it is made, as OpenAI does;
    # N sends a stream's first token at once and then N at a time, so every hop handles N times fewer events.
    # Each event costs the mesh about 0.46 ms of CPU over Envoy, the router and the replica's frontend on these
    # cores (bench/reports/stream_tokens.md): a busy GPU replica may trade smoother streams for CPU here.
    stream_interval: int = Field(default=1, ge=1)
    # KV cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE); vLLM takes about 8 unset.
    cpu_kv_cache_gib: int = 1
    # Run vLLM's engine core inside this process (faster start, shares the event loop).
    in_process_engine: bool = False
    # vLLM's custom ops the engine runs (it runs eagerly, so all by default), comma-separated as vLLM's
    # compilation_config.custom_ops: "-name" runs that op's PyTorch implementation instead. vLLM 0.32's CPU
    # kernel for rotary embeddings gives wrong answers on CPUs with AVX-512 FP16 and AMX (SmolLM2 answered
    # "L'Étoile, la Marseillaise..." for the capital of France; vLLM's server too with --enforce-eager;
    # the same family as vllm-project/vllm#31626): native RoPE here. On GPUs set "all".
    custom_ops: str = "all,-rotary_embedding"
    # Fraction of GPU memory vLLM may take (ignored on CPU).
    gpu_memory_utilization: float = 0.9
    # vLLM server flags for its OpenAI serving layer, as `vllm serve` takes them: the model's tool parser
    # and chat template live here (the packaged SmolLM2 writes tool calls as hermes does). OpenAI's contract
    # says a tool call's arguments match the tool's parameters: vLLM's default strict level (auto) leaves
    # them unconstrained unless a tool says strict (SmolLM2 then answered "\"Paris\"" for an object
    # schema); `parameter` holds every call to its tool's schema through structured outputs.
    serve_flags: str = "--enable-auto-tool-choice --tool-call-parser hermes --tool-strict-level parameter"
    # Folder for vLLM's caches and IPC sockets.
    cache_dir: str = "var/cache/vllm"

    def ipc_dir(self) -> Path:
        """A short folder for vLLM's IPC sockets: a Unix socket path must fit in 107 bytes,
        which a cache folder deep in a checkout need not."""
        digest = hashlib.sha256(str(Path(self.cache_dir).resolve()).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"meshserve-ipc-{digest}"

    def custom_ops_list(self) -> list[str]:
        return [op.strip() for op in self.custom_ops.split(",") if op.strip()]

    def vllm_env(self) -> dict[str, str]:
        """The environment vLLM reads at import time, derived from these settings."""
        cache = str(Path(self.cache_dir).resolve())
        return {
            "VLLM_CPU_KVCACHE_SPACE": str(self.cpu_kv_cache_gib),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "VLLM_HOST_IP": self.host if self.host != "0.0.0.0" else "127.0.0.1",
            "VLLM_CACHE_ROOT": cache,
            "VLLM_RPC_BASE_PATH": str(self.ipc_dir()),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if self.in_process_engine else "1",
        }
