"""Garbage-collection pauses of the mesh's services, with the start-up heap frozen (the default) and without.

A full collection walks every object the process tracks; every call of the process waits meanwhile. Each round
starts the whole mesh over a scripted replica (as bench.gateways runs it) with `*_GC_FREEZE` on or off, the two
alternated, drives it with wrk for `--seconds`, then reads each service's `meshserve_gc_pause_seconds`
histogram from its /metrics: full (generation 2) collections, their total pause and the largest (the upper
bound of its histogram bucket), and the pauses of every generation per second; with wrk's latencies. The
freeze's own full collection, before the load, is what walking the start-up heap costs: each full collection
costs about that where the heap is not frozen.

With `--engine vllm` the replica is a real one (vLLM's CPU engine serving the chat model; wrk sends unary chats
of 8 tokens), whose start-up heap holds vLLM, PyTorch and the tokenizer; the report goes to gc_pauses_vllm.md.

    python -m bench.gc_pauses [--rounds 2] [--seconds 40] [--connections 8] [--engine scripted|vllm]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.edge_vs_vllm import MODEL
from bench.loadgen import post_script, write_report, wrk, wrk_state
from bench.profile_path import whole_path
from services.inference import model_store
from services.mesh.local import LocalMesh, MeshOptions

ROOT = Path(__file__).resolve().parents[1]
PREFIXES = ("MESHSERVE_", *(f"MESHSERVE_{s}_" for s in ("ROUTER", "AUTH", "RATELIMIT", "BILLING", "INFERENCE")))
MODES = {"frozen": "true", "not frozen": "false"}
REPLICAS = {"scripted": "a scripted", "vllm": "a real vLLM"}

Pauses = dict[str, dict[str, float]]


def pauses(metrics_url: str) -> dict[str, float]:
    """One service's collections so far: full ones and their total pause (ms), every generation's total pause
    (ms), and the full collections at or under each bucket bound ("le <bound>", cumulative)."""
    text = httpx.get(metrics_url, timeout=10).text
    row = {"full": 0.0, "full ms": 0.0, "all ms": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name != "meshserve_gc_pause_seconds":
            continue
        for sample in family.samples:
            full = sample.labels.get("generation") == "2"
            if sample.name.endswith("_sum"):
                row["all ms"] += sample.value * 1e3
                if full:
                    row["full ms"] = sample.value * 1e3
            elif sample.name.endswith("_count") and full:
                row["full"] = sample.value
            elif sample.name.endswith("_bucket") and full:
                row["le " + sample.labels["le"]] = sample.value
    return row


def largest(before: dict[str, float], after: dict[str, float]) -> float:
    """The largest full collection between the two readings, as its bucket's upper bound in ms (0: none)."""
    bounds = sorted((float(k[3:]), k) for k in after if k.startswith("le "))
    largest_ms, below = 0.0, 0.0
    for bound, key in bounds:
        landed = after[key] - before.get(key, 0.0)
        if landed > below:
            largest_ms, below = (bound * 1e3 if math.isfinite(bound) else math.inf), landed
    return largest_ms


@contextmanager
def real_path(name: str) -> Iterator[tuple[LocalMesh, str, dict[str, str], Path]]:
    """The whole mesh over a real replica of the chat model, as whole_path gives the scripted one."""
    state = wrk_state(name)
    chat_dir = model_store.ensure(model_store.ModelStore(ROOT / "var" / "models"), MODEL)
    mesh = LocalMesh(MeshOptions(state_dir=state / "mesh", model=MODEL, model_store=chat_dir.parent))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
    script = post_script(state / "post-unary.lua", body)
    try:
        mesh.start(timeout=600)
        yield mesh, f"{mesh.edge_url}/v1/chat/completions", {"authorization": f"Bearer {mesh.user_key}"}, script
    finally:
        mesh.stop()


def one_round(mode: str, args: argparse.Namespace) -> tuple[dict[str, float], Pauses]:
    """wrk's result and each service's pauses during the load, with the freeze as mode says."""
    for prefix in PREFIXES:
        os.environ[prefix + "GC_FREEZE"] = MODES[mode]
    path = real_path if args.engine == "vllm" else whole_path
    with path(f"bench-gc-{mode.replace(' ', '-')}") as (mesh, url, headers, script):
        urls = {
            name: f"http://127.0.0.1:{proc.metrics_port}/metrics"
            for name, proc in mesh.procs.items()
            if proc.metrics_port > 0
        }
        before = {name: pauses(u) for name, u in urls.items()}
        # A real engine on these CPUs can take longer than wrk's default timeout of 2 s.
        result = wrk(url, args.connections, args.seconds, headers, script, timeout_seconds=120)
        after = {name: pauses(u) for name, u in urls.items()}
    rows = {}
    for name in urls:
        row = {k: after[name][k] - before[name][k] for k in ("full", "full ms", "all ms")}
        row["all ms per s"] = row.pop("all ms") / args.seconds
        row["largest full ms"] = largest(before[name], after[name])
        row["start-up full ms"] = largest({}, before[name])
        rows[name] = row
    return result, rows


def report(results: dict[str, list[tuple[dict[str, float], Pauses]]], args: argparse.Namespace, t0: float) -> list[str]:
    def med(values: list[float]) -> float:
        return statistics.median(values) if values else 0.0

    services = sorted({name for rounds in results.values() for _, rows in rounds for name in rows})
    lines = [
        "# Garbage-collection pauses: the start-up heap frozen, and not",
        "",
        f"The whole mesh over {REPLICAS[args.engine]} replica, wrk at {args.connections} connections "
        f"for {args.seconds} s per round, {args.rounds} rounds per mode alternated (the mesh restarted "
        "each round). Pauses from each service's `meshserve_gc_pause_seconds` around the load; medians "
        "of the rounds (the largest full collections: the largest over the rounds, as the upper bound of "
        "its histogram bucket). Machine: 2 cores, shared. "
        f"Ran {time.strftime('%Y-%m-%d %H:%M', time.gmtime(t0))} UTC for {time.time() - t0:.0f} s.",
        "",
        "| service | heap | the freeze's own full collection, ms (≤) | full collections under load "
        "| their pause, ms | largest, ms (≤) | every collection, ms per s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in services:
        for mode, rounds in results.items():
            rows = [r[name] for _, r in rounds if name in r]
            start_up = f"{max(r['start-up full ms'] for r in rows):g}" if mode == "frozen" else "-"
            largest_ms = max(r["largest full ms"] for r in rows)
            full, full_ms, every = (med([r[k] for r in rows]) for k in ("full", "full ms", "all ms per s"))
            lines.append(
                f"| {name} | {mode} | {start_up} | {full:.1f} | {full_ms:.1f} | {largest_ms:g} | {every:.2f} |"
            )
    lines += ["", "| heap | p50 ms | p99 ms | req/s |", "|---|---|---|---|"]
    for mode, rounds in results.items():
        lines.append(
            f"| {mode} | {med([r['p50_ms'] for r, _ in rounds]):.2f} | {med([r['p99_ms'] for r, _ in rounds]):.2f} "
            f"| {med([r['rps'] for r, _ in rounds]):.0f} |"
        )
    pairs = zip(results["frozen"], results["not frozen"], strict=True)
    p99 = [f["p99_ms"] / n["p99_ms"] for (f, _), (n, _) in pairs if n["p99_ms"] > 0]
    lines += ["", f"p99 latency, frozen / not frozen, median of the paired rounds: **{med(p99):.2f}**"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=40)
    parser.add_argument("--connections", type=int, default=None, help="8; 2 with --engine vllm")
    parser.add_argument("--engine", choices=("scripted", "vllm"), default="scripted")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.connections = args.connections or (2 if args.engine == "vllm" else 8)
    suffix = "_vllm" if args.engine == "vllm" else ""
    args.out = args.out or ROOT / "bench" / "reports" / f"gc_pauses{suffix}.md"
    t0 = time.time()
    results: dict[str, list[tuple[dict[str, float], Pauses]]] = {mode: [] for mode in MODES}
    for i in range(args.rounds):
        for mode in MODES if i % 2 == 0 else reversed(MODES):
            results[mode].append(one_round(mode, args))
    write_report(report(results, args, t0), args.out)


if __name__ == "__main__":
    main()
