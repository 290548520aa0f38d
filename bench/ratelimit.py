"""What the rate-limit service costs: decisions/s of one process on real Redis, and what it adds at the edge.

Part 1 drives one rate-limit replica directly over gRPC from separate client processes: Envoy-shaped
ShouldRateLimit calls (three descriptors: key, tenant, tenant+model) over 200 keys, and token
Reserve+Settle pairs with fresh request ids. It reports decisions/s of wall time and the replica's own
CPU time per decision (from /proc), so decisions per CPU-second is what one core sustains even when
the clients, Redis and the replica share this machine's two cores.

Part 2 runs three edges side by side, all with auth: Envoy + ext_authz + the rate-limit filter; Envoy +
ext_authz alone; and the floor, the rate-limit filter calling an empty server (bench.floor, which allows
every call and does nothing else). wrk drives GET /v1/models on each at concurrency 1 and 8 in
alternating rounds; the difference of the p50s is what request limiting adds, and what any Python gRPC
rate-limit service adds before its own work.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
from pathlib import Path

import grpc
import yaml
from envoy.service.ratelimit.v3 import rls_pb2

from bench import floor
from bench.loadgen import compare_edges, edge_tables, median, write_report, wrk_state
from meshserve.ratelimit.v1 import ratelimit_pb2
from services.mesh.local import LocalMesh, MeshOptions

ROOT = Path(__file__).resolve().parents[1]
HUGE = 10**12
RULES = {
    "default_plan": "bench",
    "plans": {
        "bench": {
            "requests": {
                "key": {"per_second": HUGE, "per_minute": HUGE},
                "tenant": {"per_minute": HUGE},
                "tenant_model": {"per_minute": HUGE},
            },
            "tokens": {"key": {"per_minute": HUGE}, "tenant": {"per_minute": HUGE}},
        }
    },
}
RLS_METHOD = floor.SHOULD_RATE_LIMIT
FLOOR = "ext_authz + empty rate-limit server"
RESERVE = "/meshserve.ratelimit.v1.TokenBudgetService/Reserve"
SETTLE = "/meshserve.ratelimit.v1.TokenBudgetService/Settle"


def _rls_request(key: int) -> bytes:
    request = rls_pb2.RateLimitRequest(domain="meshserve")
    for entries in ([("key_id", f"key_{key}"), ("key_rpm", "0")], [], [("model", "m")]):
        d = request.descriptors.add()
        d.entries.add(key="tenant", value="bench")
        for k, v in entries:
            d.entries.add(key=k, value=v)
    return request.SerializeToString()


async def _drive(target: str, kind: str, worker: int, concurrency: int, seconds: float) -> int:
    done = 0
    identity = lambda b: b  # noqa: E731 - bytes in, bytes out: the client spends no time on protobuf
    async with grpc.aio.insecure_channel(target) as channel:
        rls = channel.unary_unary(RLS_METHOD, request_serializer=identity, response_deserializer=identity)
        reserve = channel.unary_unary(RESERVE, request_serializer=identity, response_deserializer=identity)
        settle = channel.unary_unary(SETTLE, request_serializer=identity, response_deserializer=identity)
        bodies = [_rls_request(k) for k in range(200)]
        caller = ratelimit_pb2.Caller(tenant="bench", key_id=f"key_{worker}")
        deadline = time.perf_counter() + seconds

        async def loop(lane: int) -> None:
            nonlocal done
            n = 0
            while time.perf_counter() < deadline:
                n += 1
                if kind in ("requests", "empty RPC"):
                    await rls(bodies[(lane * 7 + n) % len(bodies)], timeout=5)
                else:
                    rid = f"w{worker}-{lane}-{n}"
                    await reserve(
                        ratelimit_pb2.ReserveRequest(
                            request_id=rid, caller=caller, model="m", prompt_tokens=20, max_tokens=100
                        ).SerializeToString(),
                        timeout=5,
                    )
                    await settle(
                        ratelimit_pb2.SettleRequest(
                            request_id=rid,
                            caller=caller,
                            model="m",
                            prompt_tokens=20,
                            completion_tokens=37,
                            outcome=ratelimit_pb2.OUTCOME_COMPLETED,
                        ).SerializeToString(),
                        timeout=5,
                    )
                done += 1

        await asyncio.gather(*(loop(i) for i in range(concurrency)))
    return done


def _client(args: tuple[str, str, int, int, float]) -> int:
    return asyncio.run(_drive(*args))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def decisions(target: str, pid: int, kind: str, clients: int, concurrency: int, seconds: float) -> dict[str, float]:
    """One round: decisions/s of wall time and the server's CPU time per decision."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(clients) as pool:
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        counts = pool.map(_client, [(target, kind, w, concurrency, seconds) for w in range(clients)])
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    total = sum(counts)
    return {"per_s": total / wall, "cpu_us": cpu / total * 1e6, "per_cpu_s": total / cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=8, help="length of one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "reports" / "ratelimit.md")
    args = parser.parse_args()
    state = wrk_state("bench-ratelimit")
    rules = state / "rules.yaml"
    rules.write_text(yaml.safe_dump(RULES))
    limited = LocalMesh(
        MeshOptions(state_dir=state / "with", model="m", model_store=Path("unused"), ratelimit_rules=rules, mtls=False)
    )
    # The rate-limit service measured alone, dialled directly: plaintext, like the numbers on record.
    plain = LocalMesh(MeshOptions(state_dir=state / "without", model="m", model_store=Path("unused"), mtls=False))
    empty = LocalMesh(MeshOptions(state_dir=state / "floor", model="m", model_store=Path("unused"), mtls=False))
    started = time.time()
    rounds: dict[str, list[dict[str, float]]] = {"requests": [], "tokens": [], "empty RPC": []}
    try:
        for mesh in (limited, plain, empty):
            mesh.start_redis()
            mesh.wait_serving(mesh.start_auth(), 30)
            if mesh is limited:
                mesh.wait_serving(mesh.start_ratelimit(), 30)
            elif mesh is empty:
                floor.start(mesh, "ratelimit")
            mesh.wait_serving(mesh.start_router(replicas=["127.0.0.1:1"], required_for_ready=False), 30)
            mesh.start_envoy()
            mesh.wait_edge(30)
            mesh.ensure_user_key()
        replica, nothing = limited.procs["ratelimit"], empty.procs["ratelimit"]
        servers = {
            "requests": (f"127.0.0.1:{replica.grpc_port}", replica.popen.pid),
            "tokens": (f"127.0.0.1:{replica.grpc_port}", replica.popen.pid),
            "empty RPC": (f"127.0.0.1:{nothing.grpc_port}", nothing.popen.pid),
        }
        for kind, (target, pid) in servers.items():
            decisions(target, pid, kind, 2, 16, 2)  # warm-up
        for _ in range(args.rounds):
            for kind, (target, pid) in servers.items():
                r = decisions(target, pid, kind, 2, 32, args.seconds)
                rounds[kind].append(r)
                print(f"{kind:8s} {r['per_s']:7.0f}/s  {r['cpu_us']:6.1f} µs CPU each  {r['per_cpu_s']:7.0f}/CPU-s")
        targets = {
            "ext_authz": (f"{plain.edge_url}/v1/models", {"authorization": f"Bearer {plain.user_key}"}),
            "ext_authz + ratelimit": (
                f"{limited.edge_url}/v1/models",
                {"authorization": f"Bearer {limited.user_key}"},
            ),
            FLOOR: (f"{empty.edge_url}/v1/models", {"authorization": f"Bearer {empty.user_key}"}),
        }
        edge = compare_edges(targets, args.rounds, args.seconds)
    finally:
        limited.stop()
        plain.stop()
        empty.stop()

    def med(rs: list[dict[str, float]], k: str) -> float:
        return median([r[k] for r in rs])

    lines = [
        "# Rate-limit service: decisions per second and edge overhead",
        "",
        f"Run took {time.time() - started:.0f} s on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores shared by the clients, Redis and the replica; {args.rounds} rounds of "
        f"{args.seconds} s each, medians of the rounds.",
        "",
        "## One replica against real Redis",
        "",
        "A request decision is one ShouldRateLimit with Envoy's three descriptors (key: per second and per "
        "minute; tenant; tenant+model), one Lua script over 4 windows. A token decision is a Reserve and its "
        "Settle (two RPCs, two scripts). The empty RPC is the floor: the same call to a grpc.aio server "
        "that does nothing, measured the same way in the same run.",
        "",
        "| decision | decisions/s (wall) | replica CPU per decision, µs | decisions per replica CPU-second "
        "(target ≥ 5,000) |",
        "|---|---|---|---|",
    ]
    for kind, rs in rounds.items():
        lines.append(f"| {kind} | {med(rs, 'per_s'):.0f} | {med(rs, 'cpu_us'):.1f} | {med(rs, 'per_cpu_s'):.0f} |")
    empty_us = med(rounds["empty RPC"], "cpu_us")
    lines += [
        "",
        f"CPU per request decision / CPU per empty RPC: {med(rounds['requests'], 'cpu_us') / empty_us:.2f}; "
        f"per token decision (2 RPCs): {med(rounds['tokens'], 'cpu_us') / empty_us:.2f}.",
    ]
    lines += [
        "",
        "## At the edge",
        "",
        "GET /v1/models through Envoy, auth (cached key) and the router, with and without the rate-limit "
        "filter, and with the filter calling an empty server that allows every call (the floor of a Python "
        "gRPC hop); wrk with keep-alive.",
        "",
        *edge_tables(edge, "ext_authz", "ext_authz + ratelimit", "request limits", FLOOR),
    ]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
