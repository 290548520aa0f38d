"""What auth adds at the edge: a unary request through Envoy with and without ext_authz, side by side.

Three edges run at once on one machine: Envoy + ext_authz (auth service, Redis) + router; Envoy +
router without ext_authz; and the floor, Envoy + ext_authz to an empty server (bench.floor: a grpc.aio
server that allows every call and does nothing else) + router. All serve GET /v1/models (router only, no
engine). wrk drives each with keep-alive connections at concurrency 1 and 8, alternating rounds, and
reports p50/p99 latency. The floor is what any Python gRPC ext_authz service adds before its own work.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench import floor
from bench.loadgen import compare_edges, edge_tables, write_report, wrk_state
from services.mesh.local import LocalMesh, MeshOptions

ROOT = Path(__file__).resolve().parents[1]
FLOOR = "ext_authz, empty server"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5, help="length of one wrk round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "reports" / "auth_overhead.md")
    args = parser.parse_args()
    state = wrk_state("bench-auth")
    with_auth = LocalMesh(MeshOptions(state_dir=state / "with", model="m", model_store=Path("unused")))
    without = LocalMesh(MeshOptions(state_dir=state / "without", model="m", model_store=Path("unused")))
    empty = LocalMesh(MeshOptions(state_dir=state / "floor", model="m", model_store=Path("unused")))
    started = time.time()
    try:
        with_auth.start_redis()
        with_auth.wait_serving(with_auth.start_auth(), 30)
        with_auth.wait_serving(with_auth.start_router(replicas=["127.0.0.1:1"]), 30)
        with_auth.start_envoy()
        with_auth.wait_edge(30)
        with_auth.ensure_user_key()
        without.wait_serving(without.start_router(replicas=["127.0.0.1:1"], require_caller=False), 30)
        without.start_envoy()
        without.wait_edge(30)
        floor.start(empty, "auth")
        empty.wait_serving(empty.start_router(replicas=["127.0.0.1:1"], require_caller=False), 30)
        empty.start_envoy()
        empty.wait_edge(30)
        targets = {
            "no ext_authz": (f"{without.edge_url}/v1/models", {}),
            "ext_authz": (f"{with_auth.edge_url}/v1/models", {"authorization": f"Bearer {with_auth.user_key}"}),
            FLOOR: (f"{empty.edge_url}/v1/models", {}),
        }
        results = compare_edges(targets, args.rounds, args.seconds)
    finally:
        with_auth.stop()
        without.stop()
        empty.stop()
    lines = [
        "# Auth overhead at the edge",
        "",
        f"GET /v1/models through Envoy and the router: without ext_authz, with ext_authz to the auth service "
        f"(cached key), and with ext_authz to an empty server that allows every call (the floor of a Python "
        f"gRPC hop), "
        f"wrk with keep-alive, {args.rounds} alternating rounds of {args.seconds} s; medians of the rounds. "
        f"Run took {time.time() - started:.0f} s on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        *edge_tables(results, "no ext_authz", "ext_authz", "auth", FLOOR),
    ]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
