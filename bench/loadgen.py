"""A streaming load generator for OpenAI-compatible chat endpoints: TTFT and output tokens/s."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class RoundResult:
    """One round of requests at one concurrency against one target."""

    target: str
    concurrency: int
    requests: int
    wall_s: float
    completion_tokens: int
    ttfts_s: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s else 0.0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linearly interpolated; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low = math.floor(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, object]) -> tuple[float, int]:
    start = time.perf_counter()
    ttft = float("nan")
    tokens = 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if chunk.get("error"):
                raise RuntimeError(chunk["error"])
            choices = chunk.get("choices") or []
            if choices and choices[0].get("delta", {}).get("content") and ttft != ttft:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    return ttft, tokens


async def run_round(
    target: str,
    base_url: str,
    model: str,
    prompts: list[str],
    concurrency: int,
    max_tokens: int,
    headers: dict[str, str] | None = None,
) -> RoundResult:
    """Sends every prompt once, at most `concurrency` at a time, streamed, greedy."""
    url = f"{base_url}/v1/chat/completions"
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    result = RoundResult(target, concurrency, len(prompts), 0.0, 0)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits, headers=headers) as client:

        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                try:
                    ttft, tokens = await _one(client, url, body)
                except Exception:
                    result.errors += 1
                    continue
                result.ttfts_s.append(ttft)
                result.completion_tokens += tokens

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - start
    return result


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def post_script(path: Path, body: dict[str, object]) -> Path:
    """A wrk Lua script at path that POSTs body as JSON; path."""
    path.write_text(
        f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(body))}\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return path


def wrk(
    url: str,
    connections: int,
    seconds: int,
    headers: dict[str, str],
    script: Path | None = None,
    timeout_seconds: int = 2,
) -> dict[str, float]:
    """p50/p99 latency (ms) and requests/s from one wrk run (a Lua script may set the method and body); a request
    slower than timeout_seconds (wrk's own default: 2) is counted in neither."""
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"--timeout={timeout_seconds}s", "--latency", url]
    if script is not None:
        args += ["-s", str(script)]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    text = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)\s*$", text, re.M))

    def ms(v: str) -> float:
        m = re.match(r"([\d.]+)(\w+)", v)
        assert m is not None
        return float(m.group(1)) * _UNITS[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        raise RuntimeError(f"{non2xx.group(1)} failed requests against {url}:\n{text}")
    if rps is None or not {"50", "99"} <= lat.keys():
        raise RuntimeError(f"wrk reported no throughput or latency percentiles for {url}:\n{text}")
    return {"p50_ms": ms(lat["50"]), "p99_ms": ms(lat["99"]), "rps": float(rps.group(1))}


def bench_state(name: str) -> Path:
    """An empty var/<name> for a benchmark's meshes."""
    state = Path(__file__).resolve().parents[1] / "var" / name
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    return state


def wrk_state(name: str) -> Path:
    """bench_state(name) for a wrk benchmark; exits when wrk is missing."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    return bench_state(name)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


Targets = dict[str, tuple[str, dict[str, str]]]
EdgeResults = dict[int, dict[str, list[dict[str, float]]]]


def compare_edges(
    targets: Targets,
    rounds: int,
    seconds: int,
    cpu: dict[str, Callable[[], float]] | None = None,
    script: Path | None = None,
    concurrencies: tuple[int, ...] = (1, 8),
) -> EdgeResults:
    """wrk on each target (name: url, headers) at each concurrency, rounds alternating between targets;
    with cpu (target: CPU seconds of its processes so far), each round's CPU per request too; script is
    wrk's Lua script (a POST body)."""
    for url, headers in targets.values():
        wrk(url, 4, 2, headers, script)  # warm-up
    results: EdgeResults = {}
    for c in concurrencies:
        results[c] = {t: [] for t in targets}
        for _ in range(rounds):
            for target, (url, headers) in targets.items():
                used = cpu[target]() if cpu else 0.0
                r = wrk(url, c, seconds, headers, script)
                if cpu:
                    r["cpu_us"] = (cpu[target]() - used) / max(1.0, r["rps"] * seconds) * 1e6
                results[c][target].append(r)
                print(f"c={c} {target:22s} p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  {r['rps']:.0f} req/s")
    return results


def edge_tables(
    results: EdgeResults, baseline: str, measured: str, what: str, floor: str = "", target: str = " (target ≤ 0.3)"
) -> list[str]:
    """Markdown: p50/p99/req/s per target, then what `measured` adds over `baseline` (medians of the rounds),
    and what the `floor` target (an empty server in the same place) adds, when there is one."""

    def med(rs: list[dict[str, float]], k: str) -> float:
        return median([r[k] for r in rs])

    cpu = all("cpu_us" in r for by_target in results.values() for rs in by_target.values() for r in rs)

    def added(c: int, name: str) -> list[str]:
        a, b = results[c][name], results[c][baseline]
        cells = [f"{med(a, 'p50_ms') - med(b, 'p50_ms'):.3f}", f"{med(a, 'p99_ms') - med(b, 'p99_ms'):.3f}"]
        return cells + ([f"{med(a, 'cpu_us') - med(b, 'cpu_us'):.0f}"] if cpu and not floor else [])

    lines = [
        "| concurrency | edge | p50 ms | p99 ms | req/s |" + (" mesh CPU µs/request |" if cpu else ""),
        "|---|---|---|---|---|" + ("---|" if cpu else ""),
    ]
    for c, by_target in results.items():
        for name, rs in by_target.items():
            lines.append(
                f"| {c} | {name} | {med(rs, 'p50_ms'):.3f} | {med(rs, 'p99_ms'):.3f} | {med(rs, 'rps'):.0f} |"
                + (f" {med(rs, 'cpu_us'):.0f} |" if cpu else "")
            )
    header = [f"p50 added by {what}, ms{target}", "p99 added, ms"]
    header += ["CPU µs/request added"] if cpu and not floor else []
    if floor:
        header += [f"p50 added by {floor}, ms", "p99 added, ms"]
    lines += ["", "| concurrency | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for c in results:
        cells = added(c, measured) + (added(c, floor) if floor else [])
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def write_report(lines: list[str], path: Path) -> None:
    """Writes a Markdown report and prints it."""
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    print(f"report written to {path}")
