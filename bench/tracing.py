"""What tracing costs: the whole mesh with tracing off and with tracing on at 10% sampling, side by side.

Two meshes run at once on this machine, identical but for tracing: Envoy (ext_authz, rate limits),
auth, ratelimit and billing on one Redis each, the router, and a scripted replica that streams 4
tokens with no engine time, so that the mesh's own work is all there is to measure: the worst case
for tracing's share. One mesh traces nothing (no OTLP endpoint: no interceptor, no exporter); the other
has the edge sample 10% of requests and every service export over OTLP/gRPC to a collector in this
process that takes the bytes without decoding them. wrk sends the same POST /v1/chat/completions to
each, alternating rounds, at concurrency 8 (throughput) and 1 (latency); the report gives
requests/s and p50 per mesh and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import yaml

from bench.loadgen import median, write_report, wrk, wrk_state
from bench.ratelimit import cpu_seconds
from services.mesh.local import LocalMesh, MeshOptions
from tests.integration import scripted_inference

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
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
            return b""

        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(export)},
        )
        self._server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler])
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def stop(self) -> None:
        self._server.stop(0)


def start(mesh: LocalMesh, rules: Path) -> None:
    mesh.start_redis()
    auth = mesh.start_auth()
    ratelimit = mesh.start_ratelimit(rules=rules)
    billing = mesh.start_billing()
    replica = scripted_inference.start(mesh, "scripted", 4, 0)
    for proc in (auth, ratelimit, billing, replica):
        mesh.wait_serving(proc, 60)
    router = mesh.start_router(replicas=[f"127.0.0.1:{replica.grpc_port}"])
    mesh.wait_serving(router, 60)
    mesh.wait_routable(router, [replica], 30)
    mesh.start_envoy()
    mesh.wait_edge(30)
    mesh.ensure_user_key()


@contextmanager
def post_script() -> Iterator[Path]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as f:
        f.write(
            f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\nwrk.headers["Content-Type"] = "application/json"\n'
        )
        f.flush()
        yield Path(f.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=8, help="length of one wrk round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sample", type=float, default=0.1, help="share of requests traced")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "reports" / "tracing.md")
    args = parser.parse_args()
    state = wrk_state("bench-tracing")
    rules = state / "ratelimits.yaml"
    rules.write_text(yaml.safe_dump(RULES))
    collector = Collector()
    meshes = {
        "tracing off": LocalMesh(MeshOptions(state_dir=state / "off", model=MODEL, model_store=Path("unused"))),
        f"tracing on ({args.sample:.0%})": LocalMesh(
            MeshOptions(
                state_dir=state / "on",
                model=MODEL,
                model_store=Path("unused"),
                otlp_endpoint=f"127.0.0.1:{collector.port}",
                trace_sample_ratio=args.sample,
            )
        ),
    }
    started = time.time()
    results: dict[int, dict[str, list[dict[str, float]]]] = {8: {}, 1: {}}
    # CPU seconds of each mesh process and requests served, over the measured rounds.
    cpu: dict[str, dict[str, float]] = {name: {} for name in meshes}
    served = dict.fromkeys(meshes, 0.0)
    try:
        for mesh in meshes.values():
            start(mesh, rules)
        with post_script() as script:
            targets = {
                name: (f"{m.edge_url}/v1/chat/completions", {"authorization": f"Bearer {m.user_key}"})
                for name, m in meshes.items()
            }
            for url, headers in targets.values():
                wrk(url, 4, 3, headers, script)  # warm-up
            exports0 = collector.exports
            for concurrency in results:
                order = list(targets.items())
                for round_ in range(args.rounds):
                    # The order flips every round: neither mesh always runs right after the other.
                    for name, (url, headers) in order if round_ % 2 == 0 else order[::-1]:
                        procs = {p.name: p.popen.pid for p in meshes[name].procs.values() if p.alive()}
                        before = {n: cpu_seconds(pid) for n, pid in procs.items()}
                        r = wrk(url, concurrency, args.seconds, headers, script)
                        for n, pid in procs.items():
                            cpu[name][n] = cpu[name].get(n, 0.0) + cpu_seconds(pid) - before[n]
                        served[name] += r["rps"] * args.seconds
                        results[concurrency].setdefault(name, []).append(r)
                        print(f"c={concurrency} {name:18s} {r['rps']:7.0f} req/s  p50 {r['p50_ms']:.2f} ms")
            exports = collector.exports - exports0
    finally:
        for mesh in meshes.values():
            mesh.stop()
        collector.stop()

    off, on = list(meshes)

    def med(c: int, name: str, key: str) -> float:
        return median([r[key] for r in results[c][name]])

    lines = [
        "# Tracing: throughput and latency with tracing off and on",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC by `python -m bench.tracing` on this"
        " machine (2 cores shared by both meshes and wrk). Two identical meshes (Envoy with ext_authz and rate",
        "limits, auth, ratelimit, billing, router, a scripted replica of 4 tokens with no engine time): one with",
        f"tracing off, one with the edge sampling {args.sample:.0%} and every service exporting over OTLP/gRPC.",
        f"wrk POSTs /v1/chat/completions, {args.rounds} alternating rounds of {args.seconds} s per concurrency;",
        f"medians of the rounds. The collector took {exports} export calls during the measured rounds.",
        "",
        "| concurrency | mesh | req/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for c in results:
        for name in (off, on):
            lines.append(
                f"| {c} | {name} | {med(c, name, 'rps'):.0f} | {med(c, name, 'p50_ms'):.2f} | "
                f"{med(c, name, 'p99_ms'):.2f} |"
            )

    def per_request(name: str, proc: str) -> float:
        return cpu[name].get(proc, 0.0) / served[name] * 1e6

    procs = sorted(cpu[off], key=lambda p: -per_request(off, p))

    def whole(name: str) -> float:
        return sum(per_request(name, p) for p in procs)

    lines += [
        "",
        "CPU per request (µs) of each process, over all measured rounds (from /proc):",
        "",
        "| process | tracing off | tracing on | added |",
        "|---|---|---|---|",
        *(
            f"| {p} | {per_request(off, p):.0f} | {per_request(on, p):.0f} | "
            f"{per_request(on, p) - per_request(off, p):+.0f} |"
            for p in procs
        ),
        f"| whole mesh | {whole(off):.0f} | {whole(on):.0f} | {whole(on) - whole(off):+.0f} "
        f"({whole(on) / whole(off) - 1:+.1%}) |",
    ]
    lines += [
        "",
        "| concurrency | throughput on/off (target ≥ 0.95) | p50 added, ms |",
        "|---|---|---|",
        *(
            f"| {c} | {med(c, on, 'rps') / med(c, off, 'rps'):.3f} | "
            f"{med(c, on, 'p50_ms') - med(c, off, 'p50_ms'):.2f} |"
            for c in results
        ),
    ]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
