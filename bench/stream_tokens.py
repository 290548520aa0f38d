"""CPU per streamed token: what the mesh spends on each token of many concurrent streams, against vLLM's own
server on the same model and engine settings, one run.

Each round sends `--streams` streamed chat requests at once (greedy, `ignore_eos`, `max_tokens` each, so every
stream is as long), alternating between vLLM's server and the meshserve edge (the whole path: a real key,
limits, billing, mutual TLS inside). Around each round it reads from /proc the CPU time of the processes
that handle tokens once the engine has made them: on the mesh Envoy, the router and the inference replica's
frontend (its main process: AsyncLLM's output handling and the gRPC servicer; the engine core and its
worker are child processes and excluded), on vLLM's side its API server process (the same frontend and
its HTTP server). Reports µs of CPU per streamed token (completion tokens as the usage chunks say) per
process, the medians of the rounds, in all and above idle: before each round, in its seconds of quiet, each
process's idle CPU (timers, load reports, pollers) is measured, and what it would have spent idle over the
round's wall time is taken off. With a slow engine the idle share is large: a process that spends 7 ms a
second on nothing adds 60 µs to every token of a 115 tokens/s round. On-CPU time is the scheduler's own count
(/proc schedstat, in nanoseconds), not 10 ms ticks, which are too coarse for an idle window.

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
from bench.wakeups import idle_ms_per_s, on_cpu_ms

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


async def one_round(
    target: Target, streams: int, max_tokens: int, pids: dict[str, int], quiet: float = 0.0
) -> dict[str, float]:
    """µs of CPU per streamed token of each process in pids over one round, in all and above its idle CPU (ms
    per second, measured over `quiet` seconds of nothing sent first), and the tokens streamed."""
    idle = await idle_ms_per_s(pids, quiet) if quiet > 0 else {name: 0.0 for name in pids}
    url, headers = target
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        before = {name: on_cpu_ms(pid) for name, pid in pids.items()}
        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(_stream(client, max_tokens) for _ in range(streams))))
        wall = time.perf_counter() - started
        spent = {name: on_cpu_ms(pid) - before[name] for name, pid in pids.items()}
    per_token = 1000 / max(1, tokens)
    row = {name: spent[name] * per_token for name in pids}
    row |= {f"{name} above idle": (spent[name] - idle[name] * wall) * per_token for name in pids}
    row |= {f"{name} idle": idle[name] for name in pids}
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
        f"On-CPU time from /proc schedstat around each round, divided by the completion tokens streamed, in all "
        f"and above idle (the idle CPU each process spent in the {args.settle:g} s of quiet before the round, "
        f"scaled to the round's wall time, taken off); medians of the rounds. "
        f"The engine core and its worker are excluded on both sides. "
        f"Machine: 2 cores, shared. Ran {time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC "
        f"for {time.time() - started:.0f} s.",
        "",
        "| target | process | idle ms/s | CPU µs per streamed token | above idle |",
        "|---|---|---|---|---|",
    ]

    def row(target: str, label: str, parts: tuple[str, ...]) -> str:
        def total(suffix: str) -> float:
            return statistics.median(sum(r[p + suffix] for p in parts) for r in rows[target])

        return f"| {target} | {label} | {total(' idle'):.1f} | {total(''):.1f} | {total(' above idle'):.1f} |"

    lines += [row("meshserve", part, (part,)) for part in mesh_parts]
    lines.append(row("meshserve", "**Envoy + router + inference frontend** (target ≤ 40)", mesh_parts))
    lines.append(row("vllm-serve", "API server (frontend and HTTP)", ("api server",)))
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
    parser.add_argument(
        "--settle", type=float, default=3.0, help="seconds of quiet before each round (the idle CPU is measured in it)"
    )
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
                rows[name].append(
                    asyncio.run(one_round(target, args.streams, args.max_tokens, pids[name], quiet=args.settle))
                )
    write_report(report(rows, args, started).splitlines(), args.out)


if __name__ == "__main__":
    main()
