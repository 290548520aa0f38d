"""CPU per streamed token: what the mesh spends on each token of many concurrent streams, against vLLM's own
server on the same model and engine settings, one run.

Each round sends `--streams` streamed chat requests at once (greedy, `ignore_eos`, `max_tokens` each, so every
stream is as long), alternating between vLLM's server and the meshserve edge (the whole path: a real key,
limits, billing, mutual TLS inside). Around each round it reads from /proc the CPU time of the processes
that handle tokens once the engine has made them: on the mesh Envoy, the router and the inference replica's
frontend (its main process: AsyncLLM's output handling and the gRPC servicer; the engine core and its
worker are child processes and excluded), on vLLM's side its API server process (the same frontend and
its HTTP server). Reports µs of CPU per streamed token (completion tokens as the usage chunks say) per
process, the medians of the rounds.

    python -m bench.stream_tokens [--streams 64] [--max-tokens 64] [--rounds 3] [--stream-interval N]

With --stream-interval N both servers send a stream's tokens N at a time after the first (vLLM's
--stream-interval; the replica's MESHSERVE_INFERENCE_STREAM_INTERVAL): every hop handles N times fewer
events. The report then goes to stream_tokens_interval_N.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

from bench.edge_vs_vllm import MODEL, ROOT, Target, serving, side_by_side
from bench.loadgen import write_report
from bench.ratelimit import cpu_seconds

PROMPT = "Write a long story about a lighthouse keeper and the ships she guides home."


async def _stream(client: httpx.AsyncClient, max_tokens: int) -> int:
    """One streamed request; its completion tokens, from the usage chunk."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
    return tokens


async def one_round(target: Target, streams: int, max_tokens: int, pids: dict[str, int]) -> dict[str, float]:
    """µs of CPU per streamed token of each process in pids over one round, and the tokens streamed."""
    url, headers = target
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(_stream(client, max_tokens) for _ in range(streams))))
        wall = time.perf_counter() - started
        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    row = {name: (after[name] - before[name]) * 1e6 / max(1, tokens) for name in pids}
    return {**row, "tokens": float(tokens), "tokens/s": tokens / wall}


def report(rows: dict[str, list[dict[str, float]]], args: argparse.Namespace, started: float) -> str:
    def med(target: str, name: str) -> float:
        return statistics.median(r[name] for r in rows[target])

    mesh_parts = ("envoy", "router", "inference frontend")
    lines = [
        "# CPU per streamed token: meshserve's edge vs vLLM's own server",
        "",
        f"{args.streams} concurrent streamed chat completions of {args.max_tokens} tokens each ({MODEL}, greedy, "
        f"ignore_eos), {args.stream_interval} token(s) per streamed event after the first "
        f"(vLLM's --stream-interval, on both), {args.rounds} rounds alternating between the targets; "
        f"the mesh's whole path (a real key, limits, billing, mutual TLS inside). "
        f"CPU from /proc around each round, divided by the completion tokens streamed; medians of the rounds. "
        f"The engine core and its worker are excluded on both sides. "
        f"Machine: 2 cores, shared. Ran {time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC "
        f"for {time.time() - started:.0f} s.",
        "",
        "| target | process | CPU µs per streamed token |",
        "|---|---|---|",
    ]
    for part in mesh_parts:
        lines.append(f"| meshserve | {part} | {med('meshserve', part):.1f} |")
    mesh_total = statistics.median(sum(r[p] for p in mesh_parts) for r in rows["meshserve"])
    lines.append(f"| meshserve | **Envoy + router + inference frontend** (target ≤ 40) | **{mesh_total:.1f}** |")
    lines.append(f"| vllm-serve | API server (frontend and HTTP) | {med('vllm-serve', 'api server'):.1f} |")
    lines += [
        "",
        f"Tokens/s: meshserve {med('meshserve', 'tokens/s'):.1f}, vLLM's server {med('vllm-serve', 'tokens/s'):.1f}; "
        f"tokens per round: {med('meshserve', 'tokens'):.0f} and {med('vllm-serve', 'tokens'):.0f}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of quiet before each round")
    parser.add_argument("--stream-interval", type=int, default=1, help="tokens per streamed event, on both")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    suffix = f"_interval_{args.stream_interval}" if args.stream_interval > 1 else ""
    args.out = args.out or ROOT / "bench" / "reports" / f"stream_tokens{suffix}.md"
    started = time.time()
    vllm, port, mesh = side_by_side(mtls=True, stream_interval=args.stream_interval)
    rows: dict[str, list[dict[str, float]]] = {"vllm-serve": [], "meshserve": []}
    with serving(vllm, port, mesh) as targets:
        pids = {
            "vllm-serve": {"api server": vllm.pid},
            "meshserve": {
                "envoy": mesh.procs["envoy"].popen.pid,
                "router": mesh.procs["router"].popen.pid,
                "inference frontend": mesh.inference_replicas()[0].popen.pid,
            },
        }
        for name, target in targets.items():  # warm up: the first streams pay for lazy start-up
            asyncio.run(one_round(target, 4, 8, pids[name]))
        for _ in range(args.rounds):
            for name, target in targets.items():
                time.sleep(args.settle)
                rows[name].append(asyncio.run(one_round(target, args.streams, args.max_tokens, pids[name])))
    write_report(report(rows, args, started).splitlines(), args.out)


if __name__ == "__main__":
    main()
