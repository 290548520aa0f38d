"""The control path against the peer: meshserve and LiteLLM's proxy in front of engines that cost nothing.

Four targets run at once on one machine, and wrk drives each in turn, alternating in rounds (the machine is
shared and noisy): a mock OpenAI engine over HTTP alone (bench.mock_openai: the same few tokens at once);
LiteLLM's proxy in front of it (its own virtual environment under var/, `litellm[proxy]` from PyPI, a master
key and no database, so it does less than meshserve: no per-key limits, no billing); meshserve's whole path
(Envoy, ext_authz with a real key, the router counting the request and reserving its tokens, the settlement,
billing, Redis, every hop over mutual TLS) in front of a scripted replica that answers as fast; and
meshserve bare (Envoy and the router only). Unary and streamed chat completions of 4 tokens, at
concurrency 1 and 32: p50/p99 latency, what each gateway adds over the engine alone, requests/s, and the CPU
time of every process of each gateway per request (from /proc; the engines' own excluded), with the
medians of per-round ratios of meshserve's full path to LiteLLM.

    python -m bench.gateways [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import yaml

from bench.loadgen import EdgeResults, compare_edges, median, post_script, write_report, wrk_state
from bench.ratelimit import cpu_seconds
from bench.tracing import MODEL, RULES, tree_cpu_seconds
from meshserve.auth.v1 import auth_pb2
from services.mesh.local import LocalMesh, MeshOptions, free_port, wait_http_ok
from tests.integration import scripted_inference

ROOT = Path(__file__).resolve().parents[1]
LITELLM_VENV = ROOT / "var" / "litellm-venv"
# The peer, pinned so that runs compare (1.108.7: the newest whose proxy extras the registry holds);
# `--litellm SPEC` measures another.
LITELLM = "litellm[proxy]==1.108.7"
MASTER_KEY = "sk-bench-master"
TOKENS = 4
DIRECT, LITE, FULL, BARE = "engine alone", "LiteLLM proxy", "meshserve, full path", "meshserve, Envoy + router"
# The full path for a key with a spend budget of its own in a tenant with one: what budgets add (issue 20).
BUDGETED = "meshserve, full path + spend budgets"
BUDGET_TENANT = "bench-budgeted"


def _budgeted_key(mesh: LocalMesh) -> str:
    """A key with a spend budget (far from spent) in a tenant with one: its secret."""
    channel, stub, admin = mesh.admin_stub()
    with channel:
        limits = auth_pb2.KeyLimits(budget="1000000/day")
        request = auth_pb2.CreateKeyRequest(tenant=BUDGET_TENANT, limits=limits)
        return str(stub.CreateKey(request, metadata=admin, timeout=10).secret)


def budget_lines(results: EdgeResults) -> list[str]:
    """What spend budgets add to the full path: per-round differences, medians."""
    lines = [
        "",
        "| concurrency | added by spend budgets: p50 ms | CPU µs/request | CPU, budgeted / full path |",
        "|---|---|---|---|",
    ]
    for c, by in results.items():
        pairs = list(zip(by[BUDGETED], by[FULL], strict=True))
        p50 = median([b["p50_ms"] - f["p50_ms"] for b, f in pairs])
        cpu = median([b["cpu_us"] - f["cpu_us"] for b, f in pairs])
        ratio = median([b["cpu_us"] / f["cpu_us"] for b, f in pairs])
        lines.append(f"| {c} | {p50:.2f} | {cpu:.0f} | {ratio:.2f} |")
    return lines


def litellm_venv(spec: str) -> Path:
    """The `litellm` console script of a virtual environment holding spec, created once."""
    exe = LITELLM_VENV / "bin" / "litellm"
    marker = LITELLM_VENV / "installed.txt"
    if exe.exists() and marker.exists() and marker.read_text() == spec:
        return exe
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(LITELLM_VENV)], check=True)
    pip = [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, spec], check=True)
    marker.write_text(spec)
    return exe


def _version(exe: Path) -> str:
    python = exe.parent / "python"
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@contextmanager
def _process(args: list[str], ready: str, log: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    """Runs a server until the block ends; yields its pid once `ready` answers 200."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:

            def alive() -> None:
                if proc.poll() is not None:
                    raise RuntimeError(f"{args[0]} exited with {proc.returncode}; see {log}")

            if not wait_http_ok(ready, alive, 180):
                raise RuntimeError(f"{ready} not ready; see {log}")
            yield proc.pid
        finally:
            proc.terminate()
            proc.wait(30)


def _litellm_config(state: Path, engine_port: int) -> Path:
    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": f"openai/{MODEL}",
                    "api_base": f"http://127.0.0.1:{engine_port}/v1",
                    "api_key": "unused",
                },
            }
        ],
        "general_settings": {"master_key": MASTER_KEY},
    }
    path = state / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _bare(mesh: LocalMesh) -> None:
    """Envoy and the router (no auth, no limits, no billing) over a scripted replica."""
    engine = scripted_inference.start(mesh, "inference", TOKENS, 0)
    mesh.wait_serving(engine, 60)
    router = mesh.start_router(replicas=[f"127.0.0.1:{engine.grpc_port}"], require_caller=False)
    mesh.wait_serving(router, 60)
    mesh.wait_routable(router, [engine], 30)
    mesh.start_envoy()
    mesh.wait_edge(30)


def _per_process(mesh: LocalMesh) -> dict[str, float]:
    """CPU seconds so far of each of the mesh's processes, its scripted engines excluded."""
    return {name: cpu_seconds(p.popen.pid) for name, p in mesh.procs.items() if not name.startswith("inference")}


def _mesh_cpu(mesh: LocalMesh) -> float:
    return sum(_per_process(mesh).values())


def breakdown(before: dict[str, float], after: dict[str, float], results: EdgeResults, seconds: int) -> list[str]:
    """Where meshserve's CPU per unary request goes, process by process (every round of every concurrency)."""
    served = sum(r["rps"] * seconds for by_target in results.values() for r in by_target[FULL])
    used = {name: (after[name] - before[name]) / max(1.0, served) * 1e6 for name in after}
    lines = ["| process | CPU µs per unary request |", "|---|---|"]
    lines += [f"| {name} | {us:.0f} |" for name, us in sorted(used.items(), key=lambda kv: -kv[1])]
    return [*lines, f"| all | {sum(used.values()):.0f} |"]


def _script(state: Path, stream: bool) -> Path:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": TOKENS}
    if stream:
        body["stream"] = True
    return post_script(state / f"post-{'stream' if stream else 'unary'}.lua", body)


Round = dict[str, float]


def _ratio(results: EdgeResults, c: int, key: Callable[[Round, Round, Round], float]) -> float:
    """Median over rounds of key(meshserve full, LiteLLM, the engine alone), all measured in the same round."""
    by = results[c]
    return median([key(m, lite, d) for m, lite, d in zip(by[FULL], by[LITE], by[DIRECT], strict=True)])


def _added(m: Round, lite: Round, direct: Round) -> float:
    return (m["p50_ms"] - direct["p50_ms"]) / max(1e-3, lite["p50_ms"] - direct["p50_ms"])


def tables(results: EdgeResults, what: str) -> list[str]:
    def med(target: str, c: int, k: str) -> float:
        return median([r[k] for r in results[c][target]])

    lines = [
        f"{what}:",
        "",
        "| concurrency | target | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s | gateway CPU µs/request |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, by_target in results.items():
        for target in by_target:
            added = [med(target, c, k) - med(DIRECT, c, k) for k in ("p50_ms", "p99_ms")]
            cells = [med(target, c, "p50_ms"), med(target, c, "p99_ms"), *added, med(target, c, "rps")]
            text = [f"{v:.2f}" for v in cells[:-1]] + [f"{cells[-1]:.0f}"]
            cpu = "" if target == DIRECT else f"{med(target, c, 'cpu_us'):.0f}"
            lines.append(f"| {c} | {target} | " + " | ".join(text) + f" | {cpu} |")
    lines += [
        "",
        "| concurrency | CPU per request, meshserve full / LiteLLM (target ≤ 0.33) "
        "| added p50, meshserve full / LiteLLM | req/s, meshserve full / LiteLLM |",
        "|---|---|---|---|",
    ]
    for c in results:
        cpu = _ratio(results, c, lambda m, lite, _: m["cpu_us"] / lite["cpu_us"])
        rps = _ratio(results, c, lambda m, lite, _: m["rps"] / lite["rps"])
        added = _ratio(results, c, _added)
        lines.append(f"| {c} | {cpu:.2f} | {added:.2f} | {rps:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5, help="length of one wrk round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--litellm", default=LITELLM, help="the pip requirement of the LiteLLM to measure")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "reports" / "gateways.md")
    args = parser.parse_args()
    litellm = litellm_venv(args.litellm)
    state = wrk_state("bench-gateways")
    rules = state / "ratelimits.yaml"
    rules.write_text(yaml.safe_dump({**RULES, "budgets": {"tenants": {BUDGET_TENANT: {"amount": "1000000"}}}}))
    started = time.time()
    engine_port, litellm_port = free_port(), free_port()
    mock = [sys.executable, "-m", "bench.mock_openai", "--port", str(engine_port), "--tokens", str(TOKENS)]
    proxy = [str(litellm), "--config", str(_litellm_config(state, engine_port)), "--host", "127.0.0.1"]
    proxy += ["--port", str(litellm_port), "--num_workers", "1"]
    # No network beyond this machine: LiteLLM's bundled model prices, no telemetry.
    quiet = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "True"}
    full = LocalMesh(MeshOptions(state_dir=state / "full", model=MODEL, model_store=Path("unused")))
    bare = LocalMesh(MeshOptions(state_dir=state / "bare", model=MODEL, model_store=Path("unused")))
    engine_url = f"http://127.0.0.1:{engine_port}"
    lite_url = f"http://127.0.0.1:{litellm_port}"
    with (
        _process(mock, f"{engine_url}/v1/models", state / "mock.log") as mock_pid,
        _process(proxy, f"{lite_url}/health/liveliness", state / "litellm.log", quiet) as litellm_pid,
    ):
        try:
            scripted_inference.full_mesh(full, rules, TOKENS, 0)
            _bare(bare)
            path = "/v1/chat/completions"
            targets = {
                DIRECT: (engine_url + path, {}),
                LITE: (lite_url + path, {"authorization": f"Bearer {MASTER_KEY}"}),
                FULL: (full.edge_url + path, {"authorization": f"Bearer {full.user_key}"}),
                BUDGETED: (full.edge_url + path, {"authorization": f"Bearer {_budgeted_key(full)}"}),
                BARE: (bare.edge_url + path, {}),
            }
            cpu = {
                DIRECT: partial(cpu_seconds, mock_pid),
                LITE: partial(tree_cpu_seconds, litellm_pid),
                FULL: partial(_mesh_cpu, full),
                BUDGETED: partial(_mesh_cpu, full),
                BARE: partial(_mesh_cpu, bare),
            }
            runs, used = {}, []
            for stream in (False, True):
                used.append(_per_process(full))
                runs[stream] = compare_edges(
                    targets, args.rounds, args.seconds, cpu, _script(state, stream), tuple(args.concurrency)
                )
            used.append(_per_process(full))
        finally:
            full.stop()
            bare.stop()
    lines = [
        "# meshserve's control path against LiteLLM's proxy",
        "",
        f"Chat completions of {TOKENS} tokens from engines that cost nothing: a mock OpenAI server (aiohttp) alone "
        f"and behind LiteLLM {_version(litellm)} (master key, no database); a scripted replica behind meshserve's "
        "whole path (a real key, checked by the router; the request counted and its tokens reserved and settled; "
        "billing, Redis, mutual TLS inside) and behind Envoy and the router alone. wrk with keep-alive connections, "
        f"{args.rounds} rounds of {args.seconds} s alternating between the targets; medians of the rounds. "
        "Gateway CPU: every process of the gateway (LiteLLM's process tree; Envoy, auth, the rate-limit service, "
        "billing, the router and Redis), the engines excluded. Machine: 2 cores, shared. "
        f"Run took {time.time() - started:.0f} s on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        *tables(runs[False], "Unary"),
        *budget_lines(runs[False]),
        "",
        *tables(runs[True], "Streamed (SSE; latency to the end of the stream)"),
        *budget_lines(runs[True]),
        "",
        "Where meshserve's CPU goes (its full path, unary, every round at every concurrency; the warm-up's "
        "requests are not counted, so this slightly overstates):",
        "",
        *breakdown(used[0], used[1], runs[False], args.seconds),
    ]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
