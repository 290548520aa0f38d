"""Where the control path's CPU goes: the whole mesh over a scripted replica (as bench.gateways runs it), wrk
driving unary chat completions at concurrency 1, and py-spy sampling each service while it runs. Writes, per
service, the functions that hold the most samples (inclusive, then own) to bench/reports/profile_path.md.

    python -m bench.profile_path [--seconds 20] [--py-spy PATH]

py-spy is a tool, not a dependency of meshserve: pass its path (pip install py-spy in any environment).
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from bench.loadgen import post_script, write_report, wrk, wrk_state
from bench.tracing import MODEL, RULES
from services.mesh.local import LocalMesh, MeshOptions
from tests.integration import scripted_inference

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("router", "auth", "ratelimit", "billing")
TOKENS = 4


def top(collapsed: Path, most: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(inclusive, own) shares of samples per function from py-spy's collapsed stacks."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    share = 100.0 / max(1, total)
    return (
        [(f, c * share) for f, c in inclusive.most_common(most)],
        [(f, c * share) for f, c in own.most_common(most)],
    )


@contextmanager
def whole_path(name: str) -> Iterator[tuple[LocalMesh, str, dict[str, str], Path]]:
    """The whole mesh over a scripted replica in wrk state `name`, warmed up: (mesh, the chat completions URL,
    a real key's headers, wrk's script of a unary chat of TOKENS tokens); stopped after."""
    state = wrk_state(name)
    rules = state / "ratelimits.yaml"
    rules.write_text(yaml.safe_dump(RULES))
    mesh = LocalMesh(MeshOptions(state_dir=state / "full", model=MODEL, model_store=Path("unused")))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": TOKENS}
    script = post_script(state / "post-unary.lua", body)
    try:
        scripted_inference.full_mesh(mesh, rules, TOKENS, 0)
        url = f"{mesh.edge_url}/v1/chat/completions"
        headers = {"authorization": f"Bearer {mesh.user_key}"}
        wrk(url, 1, 3, headers, script)  # warm
        yield mesh, url, headers, script
    finally:
        mesh.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--py-spy", default="py-spy")
    parser.add_argument("--most", type=int, default=25)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "reports" / "profile_path.md")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp())
    with whole_path("bench-profile") as (mesh, url, headers, script):
        spies = []
        for name in SERVICES:
            record = [args.py_spy, "record", "-p", str(mesh.procs[name].popen.pid), "-d", str(args.seconds)]
            record += ["-r", "200", "-f", "raw", "-o", str(out / f"{name}.txt"), "--nonblocking"]
            spies.append(subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        result = wrk(url, 1, args.seconds, headers, script)
        for spy in spies:
            spy.wait(60)
    lines = [
        "# Where the control path's CPU goes",
        "",
        f"Whole mesh over a scripted replica, unary chat of {TOKENS} tokens at concurrency 1 for {args.seconds} s "
        f"(p50 {result['p50_ms']:.2f} ms, {result['rps']:.0f} req/s), py-spy at 200 Hz (non-blocking) on each "
        "service. Shares of the service's samples (idle waiting included in the event loop's frames).",
    ]
    for name in SERVICES:
        path = out / f"{name}.txt"
        if not path.exists():
            lines += ["", f"## {name}", "", "no samples (py-spy could not attach)"]
            continue
        inclusive, own = top(path, args.most)
        lines += ["", f"## {name}", "", "| inclusive % | function |", "|---|---|"]
        lines += [f"| {s:.1f} | `{f[:140]}` |" for f, s in inclusive]
        lines += ["", "| own % | function |", "|---|---|"]
        lines += [f"| {s:.1f} | `{f[:140]}` |" for f, s in own]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
