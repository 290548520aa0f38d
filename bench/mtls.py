"""What mutual TLS inside the mesh adds: the same edge paths with every internal hop plaintext or mTLS.

Two meshes run at once on one machine, identical but for MeshOptions.mtls, in two parts. First Envoy,
ext_authz to the auth service (a cached key) and the router, serving GET /v1/models (two internal hops per
request, no engine). Then the whole control path of a unary chat completion over a scripted replica (no
model): ext_authz, the edge's request limit, the router, the token reservation and settlement, billing, and
Redis behind auth, the rate-limit service and billing (TLS too with mTLS on). wrk drives both meshes with
keep-alive connections at concurrency 1 and 8 in alternating rounds. Connections inside the mesh are
long-lived, so what this measures is the per-request cost of encrypting and decrypting, not handshakes:
in latency, and in the CPU time of every process of each mesh per request.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import yaml

from bench.loadgen import compare_edges, edge_tables, write_report, wrk_state
from bench.ratelimit import cpu_seconds
from bench.tracing import MODEL, RULES, post_script
from services.mesh.local import LocalMesh, MeshOptions
from tests.integration import scripted_inference

ROOT = Path(__file__).resolve().parents[1]
PLAIN_REDIS = "mutual TLS, Redis plaintext"


def _start(mesh: LocalMesh) -> tuple[str, dict[str, str]]:
    mesh.start_redis()
    mesh.wait_serving(mesh.start_auth(), 30)
    mesh.wait_serving(mesh.start_router(replicas=["127.0.0.1:1"], required_for_ready=False), 30)
    mesh.start_envoy()
    mesh.wait_edge(30)
    mesh.ensure_user_key()
    return f"{mesh.edge_url}/v1/models", _key(mesh)


def _key(mesh: LocalMesh) -> dict[str, str]:
    return {"authorization": f"Bearer {mesh.user_key}"}


def _meshes(state: Path, model: str, redis_plaintext: bool = False) -> dict[str, LocalMesh]:
    unused = Path("unused")
    meshes = {
        "plaintext": LocalMesh(MeshOptions(state_dir=state / "plain", model=model, model_store=unused, mtls=False)),
        "mutual TLS": LocalMesh(MeshOptions(state_dir=state / "mtls", model=model, model_store=unused)),
    }
    if redis_plaintext:
        options = MeshOptions(state_dir=state / "mtls-plain-redis", model=model, model_store=unused, redis_tls=False)
        meshes[PLAIN_REDIS] = LocalMesh(options)
    return meshes


def _mesh_cpu(mesh: LocalMesh) -> float:
    """CPU seconds so far of every process of the mesh (Envoy, auth, the router, Redis)."""
    return sum(cpu_seconds(p.popen.pid) for p in mesh.procs.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5, help="length of one wrk round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "reports" / "mtls.md")
    args = parser.parse_args()
    state = wrk_state("bench-mtls")
    started = time.time()
    meshes = _meshes(state / "models", "m")
    try:
        targets = {name: _start(mesh) for name, mesh in meshes.items()}
        cpu = {name: partial(_mesh_cpu, mesh) for name, mesh in meshes.items()}
        results = compare_edges(targets, args.rounds, args.seconds, cpu)
    finally:
        for mesh in meshes.values():
            mesh.stop()
    rules = state / "ratelimits.yaml"
    rules.write_text(yaml.safe_dump(RULES))
    meshes = _meshes(state / "chat", MODEL, redis_plaintext=True)
    try:
        for mesh in meshes.values():
            scripted_inference.full_mesh(mesh, rules, 4, 0)
        targets = {
            n: (f"{m.edge_url}/v1/chat/completions", {"authorization": f"Bearer {m.user_key}"})
            for n, m in meshes.items()
        }
        cpu = {name: partial(_mesh_cpu, mesh) for name, mesh in meshes.items()}
        with post_script() as script:
            chat = compare_edges(targets, args.rounds, args.seconds, cpu, script)
    finally:
        for mesh in meshes.values():
            mesh.stop()
    lines = [
        "# What mutual TLS inside the mesh adds",
        "",
        "GET /v1/models through Envoy, ext_authz to the auth service (cached key) and the router, every internal "
        "hop plaintext or mutual TLS (long-lived HTTP/2 connections), wrk with keep-alive, "
        f"{args.rounds} alternating rounds of {args.seconds} s; medians of the rounds. "
        f"Run took {time.time() - started:.0f} s on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        *edge_tables(results, "plaintext", "mutual TLS", "mutual TLS", target=""),
        "",
        "The whole control path: a unary chat completion (4 tokens from a scripted replica) through ext_authz,"
        " the request limit, the router, the token reservation and its settlement, billing, and Redis (over TLS"
        " with mutual TLS on):",
        "",
        *edge_tables(chat, "plaintext", "mutual TLS", "mutual TLS", target=""),
        "",
        "Of that, what Redis over TLS costs (mutual TLS everywhere but Redis, against mutual TLS everywhere):",
        "",
        *edge_tables(chat, PLAIN_REDIS, "mutual TLS", "Redis over TLS", target="")[-4:],
    ]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
