"""What spend budgets add to a generation's control path: the router's reservation and settlement (the
rate-limit service's limiter, in process, on real Redis, as the router runs it) for a key without budgets
and for a key with a budget of its own and its tenant's budget, side by side in alternating rounds.

Per request: the first reservation (counting the request and holding its guessed tokens: one Lua script)
with the spend hold beside it (a second script in flight at the same time, only where a budget applies),
then the settlement (one script for the token windows, one for the budgets). It reports the p50 of the
reservation's wall time (what a request waits before its engine's go-ahead), this process's CPU per request
(the router's share) and Redis's CPU per request (from /proc), and the ratios of budgeted to unbudgeted,
measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import redis.asyncio as redis

from bench.loadgen import write_report
from bench.ratelimit import cpu_seconds
from services.billing.prices import Prices
from services.mesh.local import LocalMesh, MeshOptions
from services.ratelimit.budgets import Budget
from services.ratelimit.decisions import TokenCaller, TokenHold
from services.ratelimit.limiter import Limiter
from services.ratelimit.rules import Rules
from services.ratelimit.spend import Spend
from services.ratelimit.windows import SlidingWindows

ROOT = Path(__file__).resolve().parents[1]
HUGE = 10**12
MODEL = "smollm2-135m-instruct"
RULES = {
    "default_plan": "bench",
    "plans": {
        "bench": {
            "requests": {"key": {"per_second": HUGE, "per_minute": HUGE}, "tenant": {"per_minute": HUGE}},
            "tokens": {"key": {"per_minute": HUGE}, "tenant": {"per_minute": HUGE}},
        }
    },
    "budgets": {"tenants": {"budgeted": {"amount": "1000000", "period": "month"}}},
}
CALLERS = {
    "token limits only": TokenCaller("plain", "key_plain"),
    "+ key and tenant budgets": TokenCaller("budgeted", "key_b", key_budget=Budget.parse("1000000/day")),
}


async def one_round(limiter: Limiter, caller: TokenCaller, requests: int, tag: str) -> tuple[list[float], float]:
    """Reserve and settle `requests` times one after another: the reservations' wall times, and CPU seconds."""
    waits = []
    cpu = time.process_time()
    for i in range(requests):
        rid = f"{tag}-{i}"
        started = time.perf_counter()
        await limiter.reserve(rid, caller, MODEL, 40, 64, count_request=True, hold=TokenHold.IF_ROOM)
        waits.append(time.perf_counter() - started)
        await limiter.settle(rid, caller, MODEL, 38, 20, learn=True)
    return waits, time.process_time() - cpu


async def run(requests: int, rounds: int, mesh: LocalMesh, redis_pid: int) -> dict[str, dict[str, float]]:
    client = redis.Redis.from_url(mesh.redis_url, **mesh.redis_options())
    rules = Rules.parse(RULES)
    prices = Prices.from_yaml(ROOT / "deploy" / "local" / "prices.yaml")
    limiter = Limiter(lambda: rules, SlidingWindows(client), Spend(client, lambda: prices))
    results: dict[str, dict[str, list[float]]] = {name: {"wait": [], "cpu": [], "redis": []} for name in CALLERS}
    await one_round(limiter, CALLERS["token limits only"], 200, "warm")
    for r in range(rounds):
        for name, caller in CALLERS.items():
            before = cpu_seconds(redis_pid)
            waits, cpu = await one_round(limiter, caller, requests, f"{r}-{name[:4]}")
            results[name]["wait"].extend(waits)
            results[name]["cpu"].append(cpu / requests)
            results[name]["redis"].append((cpu_seconds(redis_pid) - before) / requests)
    await client.aclose()
    return {
        name: {
            "p50_ms": statistics.median(r["wait"]) * 1000,
            "cpu_us": statistics.median(r["cpu"]) * 1e6,
            "redis_us": statistics.median(r["redis"]) * 1e6,
        }
        for name, r in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="requests per round and caller")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--report", type=Path, default=ROOT / "bench" / "reports" / "spend_budgets.md")
    args = parser.parse_args()
    began = time.time()
    with tempfile.TemporaryDirectory() as state:
        mesh = LocalMesh(MeshOptions(state_dir=Path(state), model_store=Path("unused")))
        try:
            mesh.start_redis()
            pid = mesh.procs["redis"].popen.pid
            measured = asyncio.run(run(args.requests, args.rounds, mesh, pid))
        finally:
            mesh.stop()
    plain, budgeted = measured["token limits only"], measured["+ key and tenant budgets"]
    lines = [
        "# Spend budgets: what they add to a generation's control path",
        "",
        f"Run took {time.time() - began:.0f} s on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores; {args.rounds} alternating rounds of {args.requests} requests per caller, "
        "one request at a time, the router's limiter in process on real Redis.",
        "",
        "| caller | reservation p50, ms | router CPU per request, µs | Redis CPU per request, µs |",
        "|---|---|---|---|",
    ]
    for name, m in measured.items():
        lines.append(f"| {name} | {m['p50_ms']:.3f} | {m['cpu_us']:.0f} | {m['redis_us']:.0f} |")
    lines += [
        "",
        f"Added by budgets: reservation p50 +{budgeted['p50_ms'] - plain['p50_ms']:.3f} ms "
        f"({budgeted['p50_ms'] / plain['p50_ms']:.2f}x), router CPU +{budgeted['cpu_us'] - plain['cpu_us']:.0f} µs "
        f"({budgeted['cpu_us'] / plain['cpu_us']:.2f}x), Redis CPU "
        f"+{budgeted['redis_us'] - plain['redis_us']:.0f} µs per request (reservation and settlement together).",
        "",
        "A stream that outgrows its hold adds one more script per extension (it asks for as many tokens again "
        "as it holds, at least 16, so a generation of n tokens past its estimate extends about log2(n / e) "
        "times).",
    ]
    write_report(lines, args.report)


if __name__ == "__main__":
    main()
