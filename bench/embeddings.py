"""Embeddings through meshserve's edge against vLLM's own server: same model (all-MiniLM-L6-v2 from the
model store), engine settings and machine, one run.

Both serve at once; each concurrency level measures them in pairs of rounds back to back, which one goes first
alternating from pair to pair (vLLM then mesh, mesh then vLLM), so drift on a shared machine and the order hit
both alike. Each request embeds a batch of sentences; reports inputs/s and tokens/s (prompt tokens as each
server counted them) and the mesh/vLLM ratio of each: the median over pairs, and its spread (the middle half
of the pairs' ratios), since on these shared machines one pair can differ from the next by 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import httpx

from bench.edge_vs_vllm import ROOT, Target, serving, side_by_side
from bench.loadgen import write_report
from services.inference import model_store

EMBEDDING_MODEL = model_store.MINILM
SENTENCES = [
    "A hash map stores values under keys and finds them in constant time on average.",
    "The water cycle moves water between the oceans, the air and the land.",
    "Good tea needs fresh water, the right temperature and patience.",
    "Learning to code is easier with small projects and frequent feedback.",
    "Cinderella loses a glass slipper at the royal ball.",
    "The sky looks blue because air scatters short wavelengths of sunlight more.",
    "A paperclip can hold papers, reset a router or open a SIM tray.",
    "Autumn leaves turn red and gold before they fall.",
]


async def one_round(target: Target, concurrency: int, requests: int, batch: int) -> tuple[float, float]:
    """Inputs/s and prompt tokens/s of one round: requests batches of batch sentences, concurrency at once."""
    url, headers = target
    body = {"model": EMBEDDING_MODEL, "input": (SENTENCES * (batch // len(SENTENCES) + 1))[:batch]}
    tokens = 0
    pending = iter(range(requests))

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:

        async def worker() -> None:
            nonlocal tokens
            for _ in pending:
                r = await client.post("/v1/embeddings", json=body)
                r.raise_for_status()
                tokens += r.json()["usage"]["prompt_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return requests * batch / seconds, tokens / seconds


async def measure(args: argparse.Namespace, targets: dict[str, Target]) -> dict[int, dict[str, list[float]]]:
    results: dict[int, dict[str, list[float]]] = {}
    for concurrency in args.concurrency:
        rows: dict[str, list[float]] = {f"{n} {m}": [] for n in targets for m in ("inputs/s", "tokens/s")}
        for target in targets.values():  # warm both up: the first batches pay for lazy start-up
            await one_round(target, concurrency, concurrency, args.batch)
        order = list(targets.items())
        for pair in range(args.rounds):
            for name, target in order if pair % 2 == 0 else order[::-1]:
                await asyncio.sleep(args.settle)
                inputs, tokens = await one_round(target, concurrency, args.requests, args.batch)
                rows[f"{name} inputs/s"].append(inputs)
                rows[f"{name} tokens/s"].append(tokens)
        results[concurrency] = rows
    return results


def paired(rows: dict[str, list[float]], metric: str) -> tuple[float, float, float]:
    """Mesh/vLLM over pairs of rounds, each pair measured back to back: (median, 25th, 75th percentile)."""
    mesh, vllm = rows[f"meshserve {metric}"], rows[f"vllm-serve {metric}"]
    ratios = [m / v for m, v in zip(mesh, vllm, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), low, high


def _ratio(rows: dict[str, list[float]], metric: str) -> str:
    median, low, high = paired(rows, metric)
    return f"{median:.3f} ({low:.3f}-{high:.3f})"


def report(results: dict[int, dict[str, list[float]]], args: argparse.Namespace, started: float) -> str:
    lines = [
        "# Embeddings: meshserve's edge vs vLLM's own server",
        "",
        f"all-MiniLM-L6-v2 on vLLM's pooling runner (CPU), batches of {args.batch} sentences, "
        f"{args.requests} requests per round, {args.rounds} paired rounds; mesh with mutual TLS, a real API key, "
        f"token limits and billing. Ran {time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC "
        f"for {time.time() - started:.0f} s. Ratios: median over pairs of rounds of mesh/vLLM, each pair back to "
        "back (which goes first alternates), and in brackets the middle half of the pairs' ratios.",
        "",
        "| concurrency | vLLM inputs/s | mesh inputs/s | ratio inputs/s "
        "| vLLM tokens/s | mesh tokens/s | ratio tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for concurrency, rows in results.items():

        def med(name: str, rows: dict[str, list[float]] = rows) -> str:
            return f"{statistics.median(rows[name]):.1f}"

        lines.append(
            f"| {concurrency} | {med('vllm-serve inputs/s')} | {med('meshserve inputs/s')} | "
            f"{_ratio(rows, 'inputs/s')} | {med('vllm-serve tokens/s')} | {med('meshserve tokens/s')} | "
            f"{_ratio(rows, 'tokens/s')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=40, help="requests per round")
    parser.add_argument("--batch", type=int, default=16, help="sentences per request")
    parser.add_argument("--rounds", type=int, default=8, help="pairs of rounds")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds of quiet before each round")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "reports" / "embeddings.md")
    args = parser.parse_args()
    started = time.time()
    vllm, port, mesh = side_by_side(mtls=True, embeddings=True)
    with serving(vllm, port, mesh) as targets:
        results = asyncio.run(measure(args, targets))
    write_report(report(results, args, started).splitlines(), args.out)


if __name__ == "__main__":
    main()
