"""meshserve's edge against vLLM's own OpenAI server: same model, engine settings and machine, one run.

Both servers run at once; each concurrency level alternates rounds (vLLM, mesh, vLLM, mesh) so drift
on a shared machine hits both alike. Reports output tokens/s and TTFT p50/p99, and the mesh/vLLM ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from bench.loadgen import RoundResult, percentile, run_round, write_report
from bench.tracing import RULES
from services.inference import model_store, schemes
from services.inference.config import InferenceSettings
from services.mesh.local import LocalMesh, MeshOptions, free_port, wait_http_ok

ROOT = Path(__file__).resolve().parents[1]
MODEL = model_store.SMOLLM2
PROMPTS = [
    "Explain what a hash map is.",
    "Write a short poem about autumn.",
    "List five uses of a paperclip.",
    "Describe the water cycle.",
    "What makes a good cup of tea?",
    "Give three tips for learning to code.",
    "Summarize the plot of Cinderella.",
    "Why is the sky blue?",
]

Target = tuple[str, dict[str, str]]  # base URL, headers


def start_vllm_server(
    model_dir: Path, port: int, state: Path, settings: InferenceSettings, served: str = MODEL
) -> subprocess.Popen[bytes]:
    """vLLM's own OpenAI server with the engine settings the inference service uses, serving model_dir as served."""
    env = {**os.environ, **settings.vllm_env()}
    settings.ipc_dir().mkdir(mode=0o700, parents=True, exist_ok=True)
    Path(settings.cache_dir).mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        # As the replica resolves auto (float32 where this CPU only emulates the checkpoint's half precision).
        schemes.weights_dtype(model_dir, settings.dtype, settings.quantization),
        "--kv-cache-dtype",
        settings.kv_cache_dtype,
        *(("--quantization", settings.quantization) if settings.quantization else ()),
        *(("--max-model-len", str(settings.max_model_len)) if settings.max_model_len else ()),
        "--max-num-seqs",
        str(settings.max_num_seqs),
        "--stream-interval",
        str(settings.stream_interval),
        "--enforce-eager",
        "--compilation-config",
        json.dumps({"custom_ops": settings.custom_ops_list()}),
        "--no-enable-log-requests",
        # The serving flags the replicas use (the model's tool parser): the same answers, side by side.
        *shlex.split(settings.serve_flags),
    ]
    log = (state / "vllm-serve.log").open("wb")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stops vLLM's server with its engine core and workers (they run in the server's process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@contextlib.contextmanager
def vllm_server(model_dir: Path, state: Path, settings: InferenceSettings, served: str = MODEL) -> Iterator[str]:
    """vLLM's own server on a free port, healthy: its base URL; stopped, process group and all, after."""
    port = free_port()
    proc = start_vllm_server(model_dir, port, state, settings, served)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, 300)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc)


def side_by_side(
    mtls: bool, otlp_endpoint: str = "", embeddings: bool = False, stream_interval: int = 1
) -> tuple[subprocess.Popen[bytes], int, LocalMesh]:
    """vLLM's own server started on a free port (wait for it with wait_http) and a mesh not yet started, on
    the same model and engine settings; the mesh with otlp_endpoint traces every request. With embeddings,
    vLLM's server serves the embedding model (at its own context length) and the mesh serves it beside chat.
    stream_interval: tokens per streamed event on both (vLLM's --stream-interval)."""
    store = model_store.ModelStore(ROOT / "var" / "models")
    chat_dir = model_store.ensure(store, MODEL)
    served = model_store.MINILM if embeddings else MODEL
    model_dir = model_store.ensure(store, served)
    state = ROOT / "var" / ("bench-embeddings" if embeddings else "bench")
    state.mkdir(parents=True, exist_ok=True)
    settings = InferenceSettings(cache_dir=str(state / "vllm-cache"), stream_interval=stream_interval)
    if embeddings:
        settings.max_model_len = 0
    settings.ipc_dir().mkdir(mode=0o700, exist_ok=True)
    port = free_port()
    vllm = start_vllm_server(model_dir, port, state, settings, served)
    options = MeshOptions(state_dir=state / "mesh", model=MODEL, model_store=chat_dir.parent, mtls=mtls)
    # Limits checked on every request as in production, set where a benchmark's load never reaches them.
    options.ratelimit_rules = state / "ratelimits.yaml"
    options.ratelimit_rules.write_text(yaml.safe_dump(RULES))
    options.embedding_model = model_store.MINILM if embeddings else ""
    options.env["MESHSERVE_INFERENCE_STREAM_INTERVAL"] = str(stream_interval)
    if otlp_endpoint:
        options.otlp_endpoint, options.trace_sample_ratio = otlp_endpoint, 1.0
    return vllm, port, LocalMesh(options)


@contextlib.contextmanager
def serving(vllm: subprocess.Popen[bytes], port: int, mesh: LocalMesh) -> Iterator[dict[str, Target]]:
    """Both sides of side_by_side up, as load targets (the mesh's with a real API key); both stopped after."""
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", vllm, 600)
        mesh.start(timeout=600)
        yield {
            "vllm-serve": (f"http://127.0.0.1:{port}", {}),
            # The whole mesh path: a real API key (checked by the router), limits, billing, router, inference.
            "meshserve": (mesh.edge_url, {"authorization": f"Bearer {mesh.user_key}"}),
        }
    finally:
        mesh.stop()
        stop_group(vllm)


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    def alive() -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited with {proc.returncode}")

    if not wait_http_ok(url, alive, timeout):
        raise RuntimeError(f"{url} not ready in {timeout}s")


def paired_ratio(mesh: list[RoundResult], vllm: list[RoundResult]) -> float:
    """Median over rounds of mesh/vLLM tokens/s, each pair measured back to back, so slow drift cancels."""
    ratios = [m.tokens_per_s / v.tokens_per_s for m, v in zip(mesh, vllm, strict=True) if v.tokens_per_s]
    return percentile(ratios, 50)


def summarize(rounds: list[RoundResult]) -> dict[str, float]:
    ttfts = [t for r in rounds for t in r.ttfts_s]
    wall = sum(r.wall_s for r in rounds)
    tokens = sum(r.completion_tokens for r in rounds)
    return {
        "tokens_per_s": tokens / wall if wall else 0.0,
        "ttft_p50_ms": percentile(ttfts, 50) * 1000,
        "ttft_p99_ms": percentile(ttfts, 99) * 1000,
        "requests": sum(r.requests for r in rounds),
        "errors": sum(r.errors for r in rounds),
        "completion_tokens": tokens,
    }


CLIENTS = {
    "loadgen": "bench/loadgen.py (fixed prompts)",
    "vllm-bench": "vLLM's own `vllm bench serve --backend openai-chat`, unpatched (random 64-token prompts)",
}


def report(results: dict[int, dict[str, dict[str, float]]], args: argparse.Namespace, started: float) -> str:
    lines = [
        "# meshserve edge vs vLLM's OpenAI server",
        "",
        f"Client: {CLIENTS[args.client]}. "
        f"Model {MODEL}, greedy, max_tokens {args.max_tokens}, streamed with usage; "
        f"{args.rounds} alternating rounds per target and concurrency, {args.requests} requests per round "
        f"(x concurrency/4, at least the concurrency), {args.settle:g} s of quiet before each round. "
        f"The mesh's internal hops: {'mutual TLS' if args.mtls else 'plaintext (--no-mtls)'}. "
        f"Machine: {os.cpu_count()} cores. "
        f"Run took {time.time() - started:.0f} s on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| concurrency | target | output tok/s | TTFT p50 ms | TTFT p99 ms | requests | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, by_target in results.items():
        for target in ("vllm-serve", "meshserve"):
            s = by_target[target]
            lines.append(
                f"| {c} | {target} | {s['tokens_per_s']:.1f} | {s['ttft_p50_ms']:.1f} | {s['ttft_p99_ms']:.1f} "
                f"| {s['requests']:.0f} | {s['errors']:.0f} |"
            )
    lines += [
        "",
        "| concurrency | tok/s ratio mesh/vllm, pooled (target ≥ 1.0) | tok/s ratio, median of paired rounds "
        "| TTFT p50 ratio (target ≤ 1.05) | TTFT p99 ratio |",
        "|---|---|---|---|---|",
    ]
    for c, by_target in results.items():
        m, v = by_target["meshserve"], by_target["vllm-serve"]
        lines.append(
            f"| {c} | {m['tokens_per_s'] / v['tokens_per_s']:.3f} | {m['paired_tok_s_ratio']:.3f} "
            f"| {m['ttft_p50_ms'] / v['ttft_p50_ms']:.3f} | {m['ttft_p99_ms'] / v['ttft_p99_ms']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def vllm_bench_round(
    target: str, url: str, headers: dict[str, str], c: int, n: int, max_tokens: int, tokenizer: Path
) -> RoundResult:
    """One round by vLLM's own benchmark client, unpatched (random prompts of 64 tokens, ignore_eos)."""
    key = headers.get("authorization", "Bearer unused").removeprefix("Bearer ")
    args = [
        *("--backend", "openai-chat", "--base-url", url, "--endpoint", "/v1/chat/completions"),
        *("--model", MODEL, "--tokenizer", str(tokenizer), "--dataset-name", "random", "--ignore-eos"),
        *("--random-input-len", "64", "--random-output-len", str(max_tokens), "--num-prompts", str(n)),
        *("--max-concurrency", str(c), "--seed", "1", "--disable-tqdm", "--save-detailed"),
    ]
    run = subprocess.run(
        [sys.executable, "-m", "bench.vllm_bench", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OPENAI_API_KEY": key},
        cwd=ROOT,
        check=True,
    )
    line = next(x for x in reversed(run.stdout.splitlines()) if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    return RoundResult(
        target,
        c,
        requests=int(result["completed"]) + int(result["failed"]),
        wall_s=float(result["duration"]),
        completion_tokens=int(result["total_output_tokens"]),
        ttfts_s=[float(t) for t in result.get("ttfts") or [] if t],
        errors=int(result["failed"]),
    )


async def one_round(
    args: argparse.Namespace, target: str, url: str, headers: dict[str, str], prompts: list[str], c: int
) -> RoundResult:
    if args.client == "vllm-bench":
        return await asyncio.to_thread(
            vllm_bench_round, target, url, headers, c, len(prompts), args.max_tokens, args.tokenizer
        )
    return await run_round(target, url, MODEL, prompts, c, args.max_tokens, headers)


async def measure(args: argparse.Namespace, targets: dict[str, Target]) -> dict[int, dict[str, dict[str, float]]]:
    results: dict[int, dict[str, dict[str, float]]] = {}
    # Unrecorded warm-up: first requests pay for lazy start-up on both sides.
    for target, (url, headers) in targets.items():
        await one_round(args, target, url, headers, PROMPTS, 4)
    for c in args.concurrency:
        n = max(c, args.requests * max(1, c // 4))
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        rounds: dict[str, list[RoundResult]] = {t: [] for t in targets}
        for _ in range(args.rounds):
            for target, (url, headers) in targets.items():
                # Both engines share the cores; vLLM's engine core spins for about 1 s after its last
                # step, so the other target's first requests would pay for it.
                await asyncio.sleep(args.settle)
                r = await one_round(args, target, url, headers, prompts, c)
                rounds[target].append(r)
                print(
                    f"c={c:<3} {target:<11} {r.tokens_per_s:7.1f} tok/s  "
                    f"ttft p50 {percentile(r.ttfts_s, 50) * 1000:7.1f} ms  errors {r.errors}",
                    flush=True,
                )
        results[c] = {t: summarize(rs) for t, rs in rounds.items()}
        results[c]["meshserve"]["paired_tok_s_ratio"] = paired_ratio(rounds["meshserve"], rounds["vllm-serve"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=8, help="requests per round at concurrency <= 4")
    # 8: with 4, two runs of the same code on 2 shared cores differed by up to 0.18 in a TTFT ratio.
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of quiet before each round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--client",
        choices=["loadgen", "vllm-bench"],
        default="loadgen",
        help="the load generator: ours (bench/loadgen.py) or vLLM's own `vllm bench serve`, unpatched",
    )
    parser.add_argument(
        "--no-mtls", dest="mtls", action="store_false", help="run the mesh's internal hops plaintext (default: mTLS)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    suffix = "" if args.client == "loadgen" else "_vllm_bench"
    args.out = args.out or ROOT / "bench" / "reports" / f"edge_vs_vllm{suffix}.md"
    started = time.time()
    vllm, port, mesh = side_by_side(args.mtls)
    args.tokenizer = mesh.options.model_store / MODEL
    with serving(vllm, port, mesh) as targets:
        results = asyncio.run(measure(args, targets))
    write_report(report(results, args, started).splitlines(), args.out)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
