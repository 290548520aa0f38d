"""What auth adds at the edge: a unary request through Envoy with and without ext_authz, side by side.

Two edges run at once on one machine: Envoy + ext_authz (auth service, Redis) + router, and Envoy +
router without ext_authz. Both serve GET /v1/models (router only, no engine). wrk drives each with
keep-alive connections at concurrency 1 and 8, alternating rounds, and reports p50/p99 latency.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import time
from pathlib import Path

from services.mesh.local import LocalMesh, MeshOptions

ROOT = Path(__file__).resolve().parents[1]
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, connections: int, seconds: int, headers: dict[str, str]) -> dict[str, float]:
    """p50/p99 latency (ms) and requests/s from one wrk run."""
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    text = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)$", text, re.M))

    def ms(v: str) -> float:
        m = re.match(r"([\d.]+)(\w+)", v)
        assert m is not None
        return float(m.group(1)) * _UNITS[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        raise RuntimeError(f"{non2xx.group(1)} failed requests against {url}:\n{text}")
    assert rps is not None
    return {"p50_ms": ms(lat["50"]), "p99_ms": ms(lat["99"]), "rps": float(rps.group(1))}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5, help="length of one wrk round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "reports" / "auth_overhead.md")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    state = ROOT / "var" / "bench-auth"
    shutil.rmtree(state, ignore_errors=True)
    with_auth = LocalMesh(MeshOptions(state_dir=state / "with", model="m", model_store=Path("unused")))
    without = LocalMesh(MeshOptions(state_dir=state / "without", model="m", model_store=Path("unused")))
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
        targets = {
            "no ext_authz": (f"{without.edge_url}/v1/models", {}),
            "ext_authz": (f"{with_auth.edge_url}/v1/models", {"authorization": f"Bearer {with_auth.user_key}"}),
        }
        for url, headers in targets.values():
            wrk(url, 4, 2, headers)  # warm-up
        results: dict[int, dict[str, list[dict[str, float]]]] = {}
        for c in (1, 8):
            results[c] = {t: [] for t in targets}
            for _ in range(args.rounds):
                for target, (url, headers) in targets.items():
                    r = wrk(url, c, args.seconds, headers)
                    results[c][target].append(r)
                    print(
                        f"c={c} {target:13s} p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  {r['rps']:.0f} req/s"
                    )
    finally:
        with_auth.stop()
        without.stop()
    lines = [
        "# Auth overhead at the edge",
        "",
        f"GET /v1/models through Envoy and the router, with and without ext_authz (auth service, cached key), "
        f"wrk with keep-alive, {args.rounds} alternating rounds of {args.seconds} s; medians of the rounds. "
        f"Run took {time.time() - started:.0f} s on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| concurrency | edge | p50 ms | p99 ms | req/s |",
        "|---|---|---|---|---|",
    ]
    for c, by_target in results.items():
        for target, rounds in by_target.items():
            lines.append(
                f"| {c} | {target} | {median([r['p50_ms'] for r in rounds]):.3f} | "
                f"{median([r['p99_ms'] for r in rounds]):.3f} | {median([r['rps'] for r in rounds]):.0f} |"
            )
    lines += ["", "| concurrency | p50 added by auth, ms (target ≤ 0.3) | p99 added, ms |", "|---|---|---|"]
    for c, by_target in results.items():
        a, b = by_target["ext_authz"], by_target["no ext_authz"]
        lines.append(
            f"| {c} | {median([r['p50_ms'] for r in a]) - median([r['p50_ms'] for r in b]):.3f} | "
            f"{median([r['p99_ms'] for r in a]) - median([r['p99_ms'] for r in b]):.3f} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"report written to {args.out}")


if __name__ == "__main__":
    main()
