"""What quantization buys on vLLM's CPU engine: SmolLM2 unquantized (bf16), as W8A8 int8 (the model store's
smollm2-135m-instruct-w8a8) and as W8A8 int8 with an FP8 KV cache, each in a fresh engine process with the
replicas' engine settings, in alternating rounds.

Per variant: size on disk (the model store's record), the engine process's resident memory once loaded,
the KV cache's capacity in tokens within the same KV space (VLLM_CPU_KVCACHE_SPACE), load time, and
generation throughput (a batch of chat prompts at temperature 0 with a fixed number of tokens each), with
the ratios to bf16 measured in the same run. Written to bench/reports/quantized.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.loadgen import write_report
from services.inference import model_store
from services.inference.config import InferenceSettings

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "bf16": (model_store.SMOLLM2, "auto"),
    "w8a8-int8": (model_store.SMOLLM2_W8A8, "auto"),
    "w8a8-int8 + fp8 kv": (model_store.SMOLLM2_W8A8, "fp8"),
}
PROMPTS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.", "Count to ten."]


def measure(folder: str, kv_cache_dtype: str, batch: int, tokens: int) -> dict[str, float]:
    """One variant in this process (the engine core in process): its figures as a dict."""
    from vllm import LLM, SamplingParams
    from vllm.config import CompilationConfig

    settings = InferenceSettings()
    started = time.monotonic()
    llm = LLM(
        model=folder,
        dtype=settings.dtype,
        kv_cache_dtype=kv_cache_dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        enforce_eager=True,
        compilation_config=CompilationConfig(custom_ops=settings.custom_ops_list()),
    )
    loaded = time.monotonic() - started
    cache = llm.llm_engine.vllm_config.cache_config
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    messages = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(batch)]
    sampling = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.chat(messages[:2], sampling)  # warm-up
    started = time.monotonic()
    outputs = llm.chat(messages, sampling)
    elapsed = time.monotonic() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "load_s": loaded,
        "rss_mib": rss / 2**20,
        "kv_tokens": float((cache.num_gpu_blocks or 0) * (cache.block_size or 0)),
        "tokens_per_s": generated / elapsed,
    }


def run_variant(name: str, folder: Path, kv: str, batch: int, tokens: int) -> dict[str, float]:
    env = {**os.environ, **InferenceSettings().vllm_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    args = [sys.executable, "-m", "bench.quantized", "--one", str(folder), kv, str(batch), str(tokens)]
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(lines[-1].removeprefix("RESULT ")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        folder, kv, batch, tokens = args.one
        print("RESULT " + json.dumps(measure(folder, kv, int(batch), int(tokens))), flush=True)
        return
    store = model_store.ModelStore(ROOT / "var" / "models")
    folders = {name: model_store.ensure(store, model) for name, (model, _) in VARIANTS.items()}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        order = list(VARIANTS) if round_ % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            results[name].append(run_variant(name, folders[name], VARIANTS[name][1], args.batch, args.tokens))
            print(name, results[name][-1], flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    base = "bf16"
    lines = [
        "# Quantization on vLLM's CPU engine",
        "",
        f"SmolLM2-135M-Instruct, {args.rounds} rounds alternating, a batch of {args.batch} chat prompts x "
        f"{args.tokens} tokens at temperature 0, KV space {InferenceSettings().cpu_kv_cache_gib} GiB; "
        "medians, ratios to bf16 from the same run.",
        "",
        "| variant | scheme | size on disk | RSS loaded | KV cache tokens | load s | tokens/s | tokens/s ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (model, kv) in VARIANTS.items():
        record = store.record(model)
        speed = median(name, "tokens_per_s")
        lines.append(
            f"| {name} | {record['quantization']}, kv {kv} | {int(str(record['size_bytes'])) / 2**20:.0f} MiB "
            f"| {median(name, 'rss_mib'):.0f} MiB "
            f"| {median(name, 'kv_tokens'):.0f} | {median(name, 'load_s'):.1f} "
            f"| {speed:.0f} | {speed / median(base, 'tokens_per_s'):.2f} |"
        )
    lines += [
        "",
        "RSS is the engine process's resident memory once loaded, the 1 GiB KV space included; on the CPU the",
        "engine repacks Linear weights into oneDNN's own buffers, so the model's parameters do not show what the",
        "weights hold. The FP8 KV cache stores twice the tokens in the same space: on a GPU, where the KV cache",
        "fills what the weights leave, that is twice the requests in flight.",
    ]
    write_report(lines, ROOT / "bench" / "reports" / "quantized.md")


if __name__ == "__main__":
    main()
