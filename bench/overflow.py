"""Overflow to an external provider: with the local replica's capacity saturated (vLLM on CPU at max_num_seqs 2,
a router queue of 2), bursts of concurrent chat requests from a tenant that may overflow and from one that may
not, alternating in one run. The provider is vLLM's own OpenAI server on the same model on this machine (never
an address outside it); both engines share its cores, so the provider adds capacity only as far as the cores
allow: what the run shows is where the excess goes (answered by the provider instead of refused with 429).

Per tenant: requests answered per second, 429s, p50 and p99 latency of the answered, and how many the provider
answered (the router's meshserve_router_backend_requests_total{use="overflow"}).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import httpx
import yaml

from bench.edge_vs_vllm import vllm_server
from bench.loadgen import percentile, write_report
from bench.tracing import RULES
from meshserve.auth.v1 import auth_pb2
from services.cli import top
from services.inference import model_store
from services.inference.config import InferenceSettings
from services.mesh.local import LocalMesh, MeshOptions

ROOT = Path(__file__).resolve().parents[1]
MODEL = model_store.SMOLLM2
TENANTS = {"overflow on": "bench-overflow-on", "overflow off": "bench-overflow-off"}
BACKENDS = "meshserve_router_backend_requests_total"


async def burst(url: str, secret: str, concurrency: int, requests: int, max_tokens: int) -> dict[str, object]:
    """requests chat requests, concurrency at a time: (status, seconds) of each and the wall time."""
    results: list[tuple[int, float]] = []
    queue = list(range(requests))
    headers = {"authorization": f"Bearer {secret}"}

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            i = queue.pop()
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"Count to {i + 5}."}]}
            body |= {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            started = time.perf_counter()
            reply = await client.post("/v1/chat/completions", json=body, headers=headers)
            results.append((reply.status_code, time.perf_counter() - started))

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return {"results": results, "wall": time.perf_counter() - started}


def overflowed(mesh: LocalMesh) -> float:
    samples = top.scrape(f"http://127.0.0.1:{mesh.procs['router'].metrics_port}/metrics", timeout=5) or {}
    return sum(v for (n, labels), v in samples.items() if n == BACKENDS and ("use", "overflow") in labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--requests", type=int, default=24, help="Requests per tenant per round.")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--report", type=Path, default=ROOT / "bench" / "reports" / "overflow.md")
    args = parser.parse_args()

    state = ROOT / "var" / "bench-overflow"
    state.mkdir(parents=True, exist_ok=True)
    store = model_store.ModelStore(ROOT / "var" / "models")
    model_dir = model_store.ensure(store, MODEL)
    env = {"MESHSERVE_INFERENCE_MAX_NUM_SEQS": "2", "MESHSERVE_ROUTER_QUEUE_SIZE": "2"}
    options = MeshOptions(state_dir=state, model=MODEL, model_store=store.root, env=env)
    options.ratelimit_rules = state / "ratelimits.yaml"
    options.ratelimit_rules.write_text(yaml.safe_dump(RULES))
    key_file = state / "provider-key"
    key_file.write_text("sk-bench-provider\n")
    kinds = ("ok", "refused", "wall", "provider")
    stats: dict[str, dict[str, list[float]]] = {n: {k: [] for k in kinds} for n in TENANTS}
    latencies: dict[str, list[float]] = {n: [] for n in TENANTS}
    settings = InferenceSettings(cache_dir=str(state / "vllm-cache"))
    (state / "provider").mkdir(exist_ok=True)
    with vllm_server(model_dir, state / "provider", settings) as provider:
        mesh = LocalMesh(options)
        try:
            mesh.start(timeout=600)
            path = state / "router.catalogue.yaml"
            catalogue = yaml.safe_load(path.read_text())
            catalogue["providers"] = [{"name": "burst", "base_url": f"{provider}/v1", "api_key_file": str(key_file)}]
            for model in catalogue["models"]:
                if model["id"] == MODEL:
                    model["providers"] = [{"provider": "burst", "model": MODEL, "use": "overflow"}]
                    model["overflow"] = {"tenants": [TENANTS["overflow on"]], "wait_seconds": 0.5}
            path.write_text(yaml.safe_dump(catalogue))
            time.sleep(3)  # the router follows the file every 2 s
            channel, stub, admin = mesh.admin_stub()
            with channel:
                secrets = {
                    name: str(stub.CreateKey(auth_pb2.CreateKeyRequest(tenant=t), metadata=admin, timeout=10).secret)
                    for name, t in TENANTS.items()
                }
            asyncio.run(burst(mesh.edge_url, secrets["overflow off"], 2, 2, args.max_tokens))  # warm
            for _ in range(args.rounds):
                for name in TENANTS:
                    before = overflowed(mesh)
                    load = burst(mesh.edge_url, secrets[name], args.concurrency, args.requests, args.max_tokens)
                    out = asyncio.run(load)
                    results = out["results"]
                    assert isinstance(results, list)
                    ok = [s for c, s in results if c == 200]
                    stats[name]["ok"].append(len(ok))
                    stats[name]["refused"].append(sum(1 for c, _ in results if c == 429))
                    stats[name]["wall"].append(float(out["wall"]))  # type: ignore[arg-type]
                    stats[name]["provider"].append(overflowed(mesh) - before)
                    latencies[name] += ok
        finally:
            mesh.stop()

    lines = [
        "# Overflow to an external provider under saturation",
        "",
        f"Whole local mesh (vLLM on CPU, {MODEL}, max_num_seqs 2, router queue 2) with vLLM's own server on the "
        f"same model as the provider, on the same cores. {args.rounds} rounds; per round and tenant "
        f"{args.requests} chat requests of {args.max_tokens} tokens, {args.concurrency} at a time, the two tenants "
        "alternating. Only the first tenant may overflow (wait threshold 0.5 s).",
        "",
        "| tenant | answered | 429s | answered by the provider | answered/s | p50 s | p99 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in TENANTS:
        s = stats[name]
        rate = sum(s["ok"]) / sum(s["wall"])
        p50, p99 = percentile(latencies[name], 50), percentile(latencies[name], 99)
        lines.append(
            f"| {name} | {sum(s['ok']):.0f} | {sum(s['refused']):.0f} | {sum(s['provider']):.0f} | "
            f"{rate:.2f} | {p50:.2f} | {p99:.2f} |"
        )
    write_report(lines, args.report)


if __name__ == "__main__":
    main()
