"""What tracing costs: the whole mesh with tracing off and with tracing on at 10% sampling, side by side.

Three meshes run at once on this machine, identical but for tracing: Envoy (ext_authz, rate limits),
auth, ratelimit and billing on one Redis each, the router, and the inference replica. One mesh traces
nothing (no OTLP endpoint: no tracer, no exporter); a second traces nothing either and is the control,
whose gap to the first is this machine's noise; the third has the edge sample 10% of requests and every
service export over OTLP/gRPC to a collector in this process that takes the bytes without decoding them.

--engine scripted (the default) serves from a scripted replica that streams 4 tokens with no engine
time, so that the mesh's own work is all there is: the worst case for tracing's share. --engine vllm
serves from real vLLM with the packaged model, as the product runs.

Each round loads every mesh in turn, in an order that rotates every round, at concurrency 8 (throughput)
and 1 (latency). With the scripted replica, wrk POSTs the same /v1/chat/completions for a fixed time. With
vLLM, a round is a fixed piece of work, the same for every mesh: a list of different chat prompts,
streamed as the OpenAI SDK does, each generating up to 16 tokens at temperature 0 (a timed round would
count the requests still running at its end as nothing: at vLLM's 10 requests/s that alone is ±10%).
The report gives requests/s and p50 (for vLLM, of the time to first token) per mesh, the median over
rounds of each round's ratio to the untraced mesh, and the CPU per request of every process (its
children included: vLLM's engine core) from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import yaml

from bench.loadgen import median, percentile, run_round, write_report, wrk, wrk_state
from bench.ratelimit import cpu_seconds
from services.inference import model_store
from services.mesh.local import LocalMesh, MeshOptions
from tests.integration import scripted_inference

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
STREAMED_TOKENS = 16
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})
# High enough never to refuse, so every request still takes the Redis path of both limits.
RULES = {
    "default_plan": "bench",
    "failure_mode": {"requests": "closed", "tokens": "closed"},
    "plans": {
        "bench": {
            "requests": {"key": {"per_second": 10**6, "per_minute": 10**8}, "tenant": {"per_minute": 10**8}},
            "tokens": {"key": {"per_minute": 10**12}, "tenant": {"per_minute": 10**12}},
        }
    },
    "tenants": {},
}


class Collector:
    """An OTLP/gRPC trace endpoint that counts export calls and bytes and answers an empty reply."""

    def __init__(self) -> None:
        self.exports = 0
        self.bytes = 0
        self._lock = threading.Lock()

        def export(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self._lock:
                self.exports += 1
                self.bytes += len(request)
                self.received(request)
            return b""

        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(export)},
        )
        self._server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler])
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def received(self, request: bytes) -> None:
        """One export call's ExportTraceServiceRequest, as sent (under the lock); kept by subclasses."""

    def stop(self) -> None:
        self._server.stop(0)


def start(mesh: LocalMesh, rules: Path, engine: str) -> None:
    if engine == "scripted":
        scripted_inference.full_mesh(mesh, rules, 4, 0)
    else:
        mesh.options.ratelimit_rules = rules
        mesh.start(timeout=600)


@contextmanager
def post_script() -> Iterator[Path]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as f:
        f.write(
            f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\nwrk.headers["Content-Type"] = "application/json"\n'
        )
        f.flush()
        yield Path(f.name)


def streamed(url: str, headers: dict[str, str], concurrency: int, requests: int) -> dict[str, float]:
    """One fixed-work round on a vLLM mesh: `requests` different prompts, streamed, `concurrency` at a time."""
    prompts = [f"Name a fact about the number {i}." for i in range(requests)]
    r = asyncio.run(run_round("mesh", url, MODEL, prompts, concurrency, STREAMED_TOKENS, headers))
    if r.errors or r.completion_tokens < requests:
        raise RuntimeError(f"{r.errors} of {requests} requests failed against {url}, {r.completion_tokens} tokens")
    ttfts = [t * 1e3 for t in r.ttfts_s]
    return {
        "rps": requests / r.wall_s,
        "p50_ms": percentile(ttfts, 50),
        "p99_ms": percentile(ttfts, 99),
        "requests": requests,
    }


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its live descendants."""
    total = cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += tree_cpu_seconds(int(child))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=8, help="length of one wrk round (scripted engine)")
    parser.add_argument("--requests", type=int, default=48, help="requests in one round at concurrency 8 (vllm engine)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sample", type=float, default=0.1, help="share of requests traced")
    parser.add_argument("--engine", choices=("scripted", "vllm"), default="scripted")
    parser.add_argument("--out", type=Path, help="default bench/reports/tracing.md, or tracing-vllm.md")
    args = parser.parse_args()
    out = args.out or ROOT / "bench" / "reports" / ("tracing.md" if args.engine == "scripted" else "tracing-vllm.md")
    store = Path("unused")
    if args.engine == "vllm":
        store = model_store.ensure(model_store.ModelStore(ROOT / "var" / "models"), MODEL).parent
    state = wrk_state("bench-tracing")
    rules = state / "ratelimits.yaml"
    rules.write_text(yaml.safe_dump(RULES))
    collector = Collector()

    def mesh(folder: str, traced: bool) -> LocalMesh:
        endpoint = f"127.0.0.1:{collector.port}" if traced else ""
        return LocalMesh(
            MeshOptions(
                state_dir=state / folder,
                model=MODEL,
                model_store=store,
                otlp_endpoint=endpoint,
                trace_sample_ratio=args.sample,
            )
        )

    off, control, on = "tracing off", "tracing off, again", f"tracing on ({args.sample:.0%})"
    # The control is a second untraced mesh: how far two identical meshes differ here is the noise floor.
    meshes = {off: mesh("off", False), control: mesh("control", False), on: mesh("on", True)}
    started = time.time()
    results: dict[int, dict[str, list[dict[str, float]]]] = {8: {}, 1: {}}
    # CPU seconds of each mesh process and requests served, over the measured rounds.
    cpu: dict[str, dict[str, float]] = {name: {} for name in meshes}
    served = dict.fromkeys(meshes, 0.0)
    try:
        for m in meshes.values():
            start(m, rules, args.engine)
        with post_script() as script:
            targets = [(name, m.edge_url, {"authorization": f"Bearer {m.user_key}"}) for name, m in meshes.items()]

            def load(url: str, headers: dict[str, str], concurrency: int, warm_up: bool = False) -> dict[str, float]:
                if args.engine == "scripted":
                    seconds = 3 if warm_up else args.seconds
                    r = wrk(f"{url}/v1/chat/completions", concurrency, seconds, headers, script)
                    return {**r, "requests": r["rps"] * seconds}
                # At concurrency 1 a quarter of the requests: its rounds take as long as those at 8.
                return streamed(url, headers, concurrency, args.requests if concurrency > 1 else args.requests // 4)

            for _, url, headers in targets:
                load(url, headers, 4, warm_up=True)
            exports0 = collector.exports
            for concurrency in results:
                for round_ in range(args.rounds):
                    # The order rotates every round: no mesh always runs first or right after another.
                    shift = round_ % len(targets)
                    for name, url, headers in targets[shift:] + targets[:shift]:
                        procs = {p.name: p.popen.pid for p in meshes[name].procs.values() if p.alive()}
                        before = {n: tree_cpu_seconds(pid) for n, pid in procs.items()}
                        r = load(url, headers, concurrency)
                        for n, pid in procs.items():
                            cpu[name][n] = cpu[name].get(n, 0.0) + tree_cpu_seconds(pid) - before[n]
                        served[name] += r["requests"]
                        results[concurrency].setdefault(name, []).append(r)
                        print(f"c={concurrency} {name:18s} {r['rps']:7.1f} req/s  p50 {r['p50_ms']:.2f} ms")
            exports = collector.exports - exports0
    finally:
        for m in meshes.values():
            m.stop()
        collector.stop()

    def med(c: int, name: str, key: str) -> float:
        return median([r[key] for r in results[c][name]])

    cores = os.cpu_count() or 1

    replica = (
        "a scripted replica of 4 tokens with no engine time"
        if args.engine == "scripted"
        else "real vLLM on the CPU with the packaged model"
    )
    load_text = (
        f"wrk POSTs /v1/chat/completions, {args.rounds} rounds of {args.seconds} s per mesh and concurrency,"
        if args.engine == "scripted"
        else f"Every round streams the same {args.requests} different chat prompts to each mesh at concurrency 8 "
        f"({args.requests // 4} at 1), up to {STREAMED_TOKENS} tokens each at temperature 0; p50 and p99 are of "
        f"the time to first token. {args.rounds} rounds,"
    )
    lines = [
        f"# Tracing: throughput and latency with tracing off and on ({args.engine} engine)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC by "
        f"`python -m bench.tracing --engine {args.engine}` on this machine ({cores} cores shared by the meshes and "
        "the load generator).",
        f"Three identical meshes (Envoy with ext_authz and rate limits, auth, ratelimit, billing, router, {replica}):",
        f"two with tracing off, one with the edge sampling {args.sample:.0%} and every service exporting over",
        "OTLP/gRPC. The second untraced mesh is the control: its gap to the first is what this machine's noise",
        f"alone makes. {load_text}",
        "in an order that rotates every round. Ratios are medians over rounds of each round's",
        f"ratio to the untraced mesh. The collector took {exports} export calls during the measured rounds.",
        "",
        "| concurrency | mesh | req/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for c in results:
        for name in meshes:
            lines.append(
                f"| {c} | {name} | {med(c, name, 'rps'):.1f} | {med(c, name, 'p50_ms'):.2f} | "
                f"{med(c, name, 'p99_ms'):.2f} |"
            )

    def per_request(name: str, proc: str) -> float:
        return cpu[name].get(proc, 0.0) / served[name] * 1e6

    # Process -> mesh -> CPU µs per request, heaviest first, then the whole mesh.
    rows = {
        p: {name: per_request(name, p) for name in meshes} for p in sorted(cpu[off], key=lambda p: -per_request(off, p))
    }
    rows["whole mesh"] = {name: sum(row[name] for row in rows.values()) for name in meshes}
    # vLLM's CPU threads spin while they wait, so the engine's CPU follows its wall time, not its work.
    services = [p for p in rows if p not in ("whole mesh", "inference")]
    core_us = cores * 1e6 / med(8, off, "rps")  # core time this machine has per request, untraced, c=8

    def added_by_services(name: str) -> float:
        return sum(rows[p][name] - rows[p][off] for p in services)

    def gap(row: dict[str, float], name: str) -> str:
        return f"{row[name] - row[off]:+.0f} ({row[name] / row[off] - 1:+.1%})"

    lines += [
        "",
        "CPU per request (µs) of each process, over all measured rounds (from /proc):",
        "",
        f"| process | {off} | {control} | {on} | added by tracing | control's gap |",
        "|---|---|---|---|---|---|",
        *(
            f"| {p} | {row[off]:.0f} | {row[control]:.0f} | {row[on]:.0f} | {gap(row, on)} | {gap(row, control)} |"
            for p, row in rows.items()
        ),
        "",
        f"Added CPU per request in the services (every process but vLLM's): {added_by_services(on):+.0f} µs "
        f"with tracing, {added_by_services(control):+.0f} µs for the control. This machine has "
        f"{core_us / 1e3:.1f} ms of core time per request at concurrency 8 ({cores} cores over the "
        f"untraced mesh's requests/s), so tracing's CPU is {added_by_services(on) / core_us:.1%} of it: the "
        "throughput it can cost where the machine's CPU is what limits throughput.",
    ]

    def ratio(c: int, name: str, key: str) -> float:
        return median([a[key] / b[key] for a, b in zip(results[c][name], results[c][off], strict=True)])

    lines += [
        "",
        "| concurrency | throughput on/off (target ≥ 0.95) | control/off | p50 on/off | p50 control/off |",
        "|---|---|---|---|---|",
        *(
            f"| {c} | {ratio(c, on, 'rps'):.3f} | {ratio(c, control, 'rps'):.3f} | "
            f"{ratio(c, on, 'p50_ms'):.3f} | {ratio(c, control, 'p50_ms'):.3f} |"
            for c in results
        ),
    ]
    write_report(lines, out)


if __name__ == "__main__":
    main()
