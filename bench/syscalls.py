"""Why a hop costs what it costs here: system calls and wake-ups per request on the control path.

The whole mesh over a scripted replica (as bench.gateways and bench.profile_path run it), wrk driving unary chat
completions at concurrency 1, `strace -c -f` attached to each service (Envoy, the router, auth, the rate-limit
service, billing, Redis) for the run and, before it, for as long with nothing sent (the idle baseline is
subtracted). Per request: every system call by name, and the wake-ups among them (futex, eventfd and pipe writes,
poll/epoll returns), the currency of a Python gRPC hop. Beside it, this machine's price of one wake-up: a byte
sent back and forth between two processes over a pipe, median µs per round trip. strace slows the services
down, so the latency wrk reports is not the product's; the counts per request are what this measures.

    python -m bench.syscalls [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bench.loadgen import write_report, wrk
from bench.profile_path import TOKENS, whole_path

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("envoy", "router", "auth", "ratelimit", "billing", "redis")
T = TypeVar("T")
WAKE_UPS = ("futex", "write", "epoll_wait", "epoll_pwait", "poll", "sendmsg", "sendto")


def strace_counts(path: Path) -> dict[str, int]:
    """Calls per system call name from a `strace -c` summary."""
    counts = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(fields) >= 5 and re.fullmatch(r"[\d.]+", fields[0]) and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3])
    return counts


def traced(pids: dict[str, int], out: Path, run: Callable[[], T]) -> tuple[dict[str, dict[str, int]], T]:
    """Each service's system calls while run() runs, and what it returned."""
    out.mkdir(parents=True, exist_ok=True)
    tracers = [
        subprocess.Popen(
            ["strace", "-c", "-f", "-p", str(pid), "-o", str(out / f"{name}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]
    time.sleep(1)  # attached
    result = run()
    for tracer in tracers:
        tracer.terminate()
    for tracer in tracers:
        tracer.wait(30)
    return {name: strace_counts(out / f"{name}.txt") for name in pids}, result


def wake_up_us(rounds: int = 2000) -> float:
    """Median µs of one round trip of a byte between two processes over two pipes."""
    there_r, there_w = os.pipe()
    back_r, back_w = os.pipe()
    child = os.fork()
    if child == 0:
        for _ in range(rounds):
            os.read(there_r, 1)
            os.write(back_w, b"x")
        os._exit(0)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        os.write(there_w, b"x")
        os.read(back_r, 1)
        times.append(time.perf_counter() - started)
    os.waitpid(child, 0)
    for fd in (there_r, there_w, back_r, back_w):
        os.close(fd)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "reports" / "syscalls.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    with whole_path("bench-syscalls") as (mesh, url, headers, script):
        pids = {name: mesh.procs[name].popen.pid for name in SERVICES}
        idle, _ = traced(pids, work / "idle", lambda: time.sleep(args.seconds))
        busy, result = traced(pids, work / "busy", lambda: wrk(url, 1, args.seconds, headers, script))
    requests = max(1.0, result["rps"] * args.seconds)
    per = {
        name: {call: (busy[name].get(call, 0) - idle[name].get(call, 0)) / requests for call in busy[name]}
        for name in SERVICES
    }
    wake = wake_up_us()
    lines = [
        "# System calls and wake-ups per request on the control path",
        "",
        f"Whole mesh over a scripted replica, unary chat of {TOKENS} tokens, wrk at concurrency 1 for "
        f"{args.seconds} s under `strace -c -f` ({requests:.0f} requests; {result['rps']:.0f} req/s slowed by "
        f"strace), minus as long idle. Ran {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. One wake-up on "
        f"this machine (a byte to another process over a pipe and back): **{wake:.1f} µs** per round trip, median.",
        "",
        "| service | system calls per request | of them wake-ups (" + ", ".join(WAKE_UPS) + ") | most frequent |",
        "|---|---|---|---|",
    ]
    for name in SERVICES:
        calls = {c: n for c, n in per[name].items() if n > 0.05}
        total = sum(calls.values())
        wakes = sum(n for c, n in calls.items() if c in WAKE_UPS)
        most = ", ".join(f"{c} {n:.1f}" for c, n in sorted(calls.items(), key=lambda kv: -kv[1])[:6])
        lines.append(f"| {name} | {total:.0f} | {wakes:.0f} | {most} |")
    grand = sum(sum(n for n in per[name].values() if n > 0) for name in SERVICES)
    lines += ["", f"All services: {grand:.0f} system calls per request."]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
