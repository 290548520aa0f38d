"""Prefix affinity vs round robin: TTFT of a shared-prefix workload over 2 real vLLM replicas, one run.

Two routers (balance=affinity and balance=round_robin) front the same two inference replicas. Each phase
sends the same shape of workload: many long system prompts (more than one replica's KV cache holds, fewer
than two hold), each request one of them plus a short question, a few at a time. With affinity a prefix
keeps to one replica, whose prefix cache then holds it; with round robin every replica sees every
prefix and evicts them from each other. The phases use different prompt texts, so neither starts with the
other's cache. Reports TTFT p50/p99 per phase, their ratios, and the replicas' prefix-cache hit rates.

    .venv/bin/python -m bench.affinity [--prefixes 75] [--requests 375]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from pathlib import Path

import grpc
from grpc import aio

from bench.loadgen import bench_state, percentile, write_report
from meshserve.inference.v1 import inference_pb2, inference_pb2_grpc
from meshserve.llm.v1 import llm_pb2, llm_pb2_grpc
from services.mesh.local import LocalMesh, MeshOptions, Proc, core_sets

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
WORDS = (
    "order refund parcel courier invoice account password discount voucher warranty return exchange size colour "
    "delivery tracking address payment card bank transfer receipt product review rating stock supplier warehouse "
    "holiday weekend support hours policy privacy cookie newsletter subscription loyalty points gift wrapping"
).split()


def system_prompt(rng: random.Random, words: int) -> str:
    return "You are the assistant of shop " + " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def cache_totals(replicas: list[Proc]) -> tuple[int, int]:
    queries = hits = 0
    for proc in replicas:
        with grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
            load = inference_pb2_grpc.InferenceServiceStub(channel).GetLoad(inference_pb2.GetLoadRequest(), timeout=10)
        queries += load.prefix_cache_queries
        hits += load.prefix_cache_hits
    return queries, hits


async def phase(router: Proc, prompts: list[tuple[str, str]], concurrency: int) -> tuple[list[float], int]:
    """TTFT of every request (seconds) and the number of failed ones."""
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    ttfts: list[float] = []
    errors = 0
    async with aio.insecure_channel(f"127.0.0.1:{router.grpc_port}") as channel:
        llm = llm_pb2_grpc.LlmServiceStub(channel)

        async def worker() -> None:
            nonlocal errors
            while not queue.empty():
                system, question = queue.get_nowait()
                params = llm_pb2.ChatCompletionParams(
                    model=MODEL,
                    messages=[
                        llm_pb2.ChatMessage(role="system", content=system),
                        llm_pb2.ChatMessage(role="user", content=question),
                    ],
                    max_tokens=4,
                    temperature=0,
                )
                started = time.perf_counter()
                try:
                    async for chunk in llm.StreamChatCompletion(
                        llm_pb2.StreamChatCompletionRequest(params=params), timeout=300
                    ):
                        if chunk.choices and chunk.choices[0].delta.content:
                            ttfts.append(time.perf_counter() - started)
                            break
                except grpc.RpcError:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ttfts, errors


def workload(seed: int, prefixes: int, words: int, requests: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    systems = [system_prompt(rng, words) for _ in range(prefixes)]
    return [(rng.choice(systems), f"Question {i}: where is my order?") for i in range(requests)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefixes", type=int, default=75, help="distinct system prompts per phase")
    parser.add_argument("--words", type=int, default=900, help="words per system prompt (about 1.3 tokens each)")
    parser.add_argument("--requests", type=int, default=375, help="requests per phase")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="each replica's CPU KV cache")
    parser.add_argument("--report", type=Path, default=ROOT / "bench" / "reports" / "affinity.md")
    args = parser.parse_args()

    state = bench_state("bench-affinity")
    mesh = LocalMesh(
        MeshOptions(
            state_dir=state,
            model=MODEL,
            model_store=ROOT / "var" / "models",
            replicas=2,
            mtls=False,  # the router and replicas measured alone, dialled directly: plaintext
            env={"MESHSERVE_INFERENCE_CPU_KV_CACHE_GIB": str(args.kv_cache_gib)},
        )
    )
    started = time.time()
    results: dict[str, dict[str, float]] = {}
    try:
        binds = core_sets(2)
        replicas = [mesh.start_inference("inference", binds[0]), mesh.start_inference("inference-2", binds[1])]
        for proc in replicas:
            mesh.wait_serving(proc, 900)
        routers = {}
        for balance in ("round_robin", "affinity"):
            router = mesh.start_router(
                f"router-{balance}", require_caller=False, env={"MESHSERVE_ROUTER_BALANCE": balance}
            )
            mesh.wait_serving(router, 60)
            mesh.wait_routable(router, replicas, 30)
            routers[balance] = router
        for seed, balance in enumerate(routers, 1):
            prompts = workload(seed, args.prefixes, args.words, args.requests)
            before = cache_totals(replicas)
            t0 = time.perf_counter()
            ttfts, errors = asyncio.run(phase(routers[balance], prompts, args.concurrency))
            wall = time.perf_counter() - t0
            after = cache_totals(replicas)
            queries, hits = after[0] - before[0], after[1] - before[1]
            results[balance] = {
                "p50": percentile(ttfts, 50) * 1000,
                "p99": percentile(ttfts, 99) * 1000,
                "hit_rate": hits / queries if queries else float("nan"),
                "errors": errors,
                "wall": wall,
            }
            r = results[balance]
            print(
                f"{balance:12s} TTFT p50 {r['p50']:.0f} ms  p99 {r['p99']:.0f} ms  "
                f"prefix-cache hits {r['hit_rate']:.0%}  errors {errors}  {wall:.0f} s"
            )
    finally:
        mesh.stop()

    rr, aff = results["round_robin"], results["affinity"]
    lines = [
        "# Prefix affinity vs round robin (2 vLLM CPU replicas)",
        "",
        f"Run took {time.time() - started:.0f} s on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores shared by both engines, both routers and the client. Per phase: "
        f"{args.requests} requests at concurrency {args.concurrency}, each one of {args.prefixes} system prompts "
        f"of {args.words} words plus a short question, max_tokens 4; KV cache {args.kv_cache_gib} GiB per replica; "
        f"engine threads bound to cores {' and '.join(binds)}. "
        "TTFT is measured at the router's gRPC port (time to the first content chunk).",
        "",
        "| balance | TTFT p50 ms | TTFT p99 ms | prefix-cache hit rate (tokens) | errors | phase s |",
        "|---|---|---|---|---|---|",
    ]
    for balance, r in results.items():
        lines.append(
            f"| {balance} | {r['p50']:.0f} | {r['p99']:.0f} | {r['hit_rate']:.0%} "
            f"| {r['errors']:.0f} | {r['wall']:.0f} |"
        )
    lines += [
        "",
        f"TTFT p50 round robin / affinity: **{rr['p50'] / aff['p50']:.2f}x** (target ≥ 2x); "
        f"p99: {rr['p99'] / aff['p99']:.2f}x.",
    ]
    write_report(lines, args.report)


if __name__ == "__main__":
    main()
