"""What the response cache saves: a deterministic request answered from the cache (a hit) against the same
kind of request answered by the engine (a miss), through the whole local mesh (edge, auth, limits, router,
billing, vLLM on CPU), in alternating rounds of one run.

Misses ask a question not asked before (each a new prompt, temperature 0); hits ask one question again.
Both are unary chat requests of max_tokens 16 and 64, and streams of 64 (time to the first event). Every
answer's x-meshserve-cache header is checked: a miss answered from the cache, or a hit from the engine, is
counted as an error. The report gives p50 and p99 per kind and the miss/hit ratio of the p50s.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import httpx
import yaml

from bench.loadgen import percentile, write_report
from bench.tracing import RULES
from services.inference import model_store
from services.mesh.local import LocalMesh, MeshOptions

ROOT = Path(__file__).resolve().parents[1]
MODEL = model_store.SMOLLM2
KINDS = (("unary, 16 tokens", 16, False), ("unary, 64 tokens", 64, False), ("stream, 64 tokens: first event", 64, True))


def ask(client: httpx.Client, question: str, max_tokens: int, stream: bool) -> tuple[float, str]:
    """Seconds to the whole answer (unary) or to the first event (stream), and the cache header."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    started = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        chunks = r.iter_bytes()
        if stream:
            next(chunks, None)
        else:
            for _ in chunks:
                pass
        took = time.perf_counter() - started
        for _ in chunks:
            pass
        return took, r.headers.get("x-meshserve-cache", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=10, help="Requests per kind, hit and miss, per round.")
    parser.add_argument("--report", type=Path, default=ROOT / "bench" / "reports" / "response_cache.md")
    args = parser.parse_args()

    state = ROOT / "var" / "bench-cache"
    store = model_store.ModelStore(ROOT / "var" / "models")
    model_store.ensure(store, MODEL)
    options = MeshOptions(state_dir=state, model=MODEL, model_store=store.root, cache="tenant")
    options.ratelimit_rules = state / "ratelimits.yaml"
    state.mkdir(parents=True, exist_ok=True)
    options.ratelimit_rules.write_text(yaml.safe_dump(RULES))
    mesh = LocalMesh(options)
    times: dict[tuple[str, str], list[float]] = {(k, r): [] for k, _, _ in KINDS for r in ("hit", "miss")}
    errors = 0
    try:
        mesh.start(timeout=600)
        headers = {"authorization": f"Bearer {mesh.user_key}"}
        with httpx.Client(base_url=mesh.edge_url, headers=headers, timeout=120) as client:
            for kind, most, stream in KINDS:  # warm: the engine, and each kind's cached answer
                ask(client, f"Warm up ({kind}).", most, stream)
                ask(client, f"What is the capital of France? ({kind})", most, stream)
            for r in range(args.rounds):
                for kind, most, stream in KINDS:
                    for i in range(args.requests):
                        took, said = ask(client, f"Round {r}, question {i}: what is 17 + {i}? ({kind})", most, stream)
                        times[(kind, "miss")].append(took)
                        errors += said != "miss"
                        took, said = ask(client, f"What is the capital of France? ({kind})", most, stream)
                        times[(kind, "hit")].append(took)
                        errors += said != "hit"
    finally:
        mesh.stop()

    lines = [
        "# Response cache: hit vs miss",
        "",
        f"Whole local mesh (edge, auth, limits, router, billing, vLLM on CPU, {MODEL}), one run, {args.rounds} "
        f"alternating rounds of {args.requests} misses and {args.requests} hits per kind. Answers whose "
        f"x-meshserve-cache header said otherwise than expected: {errors}.",
        "",
        "| kind | miss p50 ms | miss p99 ms | hit p50 ms | hit p99 ms | miss/hit p50 |",
        "|---|---|---|---|---|---|",
    ]
    for kind, _, _ in KINDS:
        miss, hit = times[(kind, "miss")], times[(kind, "hit")]
        m50, h50 = percentile(miss, 50) * 1000, percentile(hit, 50) * 1000
        m99, h99 = percentile(miss, 99) * 1000, percentile(hit, 99) * 1000
        lines.append(f"| {kind} | {m50:.1f} | {m99:.1f} | {h50:.1f} | {h99:.1f} | {m50 / h50:.1f} |")
    write_report(lines, args.report)


if __name__ == "__main__":
    main()
