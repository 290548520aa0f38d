"""What a request costs each process of the mesh when requests come back to back, and when they come apart.

At concurrency 1 against a slow engine (an embeddings batch takes ~60 ms on these CPUs) every process of the
path sleeps between requests. This measures, on the whole mesh over a scripted replica (as bench.gateways runs
it), the on-CPU time (/proc schedstat) each process spends per unary chat request with requests sent back to back
and with a pause before each, alternated in rounds; the idle CPU of each process (nothing sent); and, in this
process, the same memory-walking Python work timed back to back and after the same pauses (the machine's own
share of the effect, with no mesh involved).

    python -m bench.wakeups [--rounds 2] [--requests 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from pathlib import Path

import httpx

from bench.loadgen import write_report
from bench.profile_path import TOKENS, whole_path
from bench.tracing import MODEL

ROOT = Path(__file__).resolve().parents[1]
PAUSES = (0.0, 0.01, 0.03, 0.07, 0.15)
IDLE_SECONDS = 10


def on_cpu_ms(pid: int) -> float:
    """Milliseconds every thread of pid has run on a CPU: the scheduler's own count, in nanoseconds (not
    bench.ratelimit.cpu_seconds's 10 ms ticks, longer than most services spend on one request)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
            total += int(stat.read().split()[0])
    return total / 1e6


async def idle_ms_per_s(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Each process's on-CPU ms per second over `seconds` of nothing sent (what it spends idle)."""
    before = {name: on_cpu_ms(pid) for name, pid in pids.items()}
    await asyncio.sleep(seconds)
    return {name: (on_cpu_ms(pid) - before[name]) / seconds for name, pid in pids.items()}


def _walk(objects: list[dict[str, int]], order: list[int]) -> int:
    return sum(objects[i]["n"] for i in order)


def machine_probe(pauses: tuple[float, ...], repeats: int = 30) -> dict[float, float]:
    """Median CPU ms of one walk through 60 MB of Python objects, after each pause."""
    objects = [{"n": i} for i in range(300_000)]
    order = [random.randrange(len(objects)) for _ in range(20_000)]
    medians = {}
    for pause in pauses:
        times = []
        for _ in range(repeats):
            if pause:
                time.sleep(pause)
            start = time.thread_time_ns()
            _walk(objects, order)
            times.append((time.thread_time_ns() - start) / 1e6)
        medians[pause] = statistics.median(times)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "reports" / "wakeups.md")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    probe = machine_probe(PAUSES)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": TOKENS}
    per_request: dict[float, dict[str, list[float]]] = {p: {} for p in PAUSES}
    with whole_path("bench-wakeups") as (mesh, url, headers, _):
        pids = {name: proc.popen.pid for name, proc in mesh.procs.items()}
        idle = asyncio.run(idle_ms_per_s(pids, IDLE_SECONDS))
        with httpx.Client(headers=headers, timeout=30) as client:
            for _ in range(args.rounds):
                for pause in PAUSES:
                    before = {name: on_cpu_ms(pid) for name, pid in pids.items()}
                    for _ in range(args.requests):
                        if pause:
                            time.sleep(pause)
                        client.post(url, json=body).raise_for_status()
                    for name, pid in pids.items():
                        spent = (on_cpu_ms(pid) - before[name]) / args.requests
                        per_request[pause].setdefault(name, []).append(spent)
    names = sorted(pids, key=lambda n: -statistics.median(per_request[0.0][n]))

    def cell(pause: float, name: str) -> float:
        return statistics.median(per_request[pause][name])

    lines = [
        "# What a request costs each process, back to back and apart",
        "",
        f"Ran {started}. Whole mesh over a scripted replica (mutual TLS, a real key, request and token limits, "
        f"billing), unary chat of {TOKENS} tokens, {args.requests} requests per cell, medians of {args.rounds} "
        "rounds. On-CPU time from /proc schedstat, per request; a pause is slept before each request.",
        "",
        "| process | idle ms/s | " + " | ".join(f"pause {p * 1000:g} ms" for p in PAUSES) + " | apart / back to back |",
        "|---|---|" + "---|" * len(PAUSES) + "---|",
    ]
    for name in names:
        row = " | ".join(f"{cell(p, name):.2f}" for p in PAUSES)
        ratio = cell(PAUSES[-2], name) / max(cell(0.0, name), 1e-3)
        lines.append(f"| {name} | {idle[name]:.1f} | {row} | {ratio:.1f}x |")
    totals = {p: sum(cell(p, n) for n in names) for p in PAUSES}
    lines.append(
        "| **mesh** | "
        + f"{sum(idle.values()):.1f} | "
        + " | ".join(f"**{totals[p]:.2f}**" for p in PAUSES)
        + f" | **{totals[PAUSES[-2]] / totals[0.0]:.1f}x** |"
    )
    lines += [
        "",
        f"'apart / back to back' compares the {PAUSES[-2] * 1000:g} ms pause (an embeddings batch's time on these "
        "CPUs) with none. Idle CPU counts in the paused cells: a process idling at x ms/s adds about x times the "
        "pause (in seconds) to each request there.",
        "",
        "The machine alone (this process, no mesh): one walk through 60 MB of Python objects, median CPU ms",
        "",
        "| " + " | ".join(f"pause {p * 1000:g} ms" for p in PAUSES) + " |",
        "|" + "---|" * len(PAUSES),
        "| " + " | ".join(f"{probe[p]:.2f}" for p in PAUSES) + " |",
    ]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
