"""Where the time to first token goes at concurrency 1: vLLM's own server, a replica's Serve, the edge.

One request at a time, the three targets interleaved with quiet between requests (vLLM's engine core spins
for about a second after its last step). Each target gets prompts of the same length that no engine has
seen (no prefix-cache hits). For each request the engine's own time to first token (vLLM's
vllm:time_to_first_token_seconds, from the request's arrival in AsyncLLM to its first output) is read from
the server's metrics before and after, so what the client waits beyond it is the frontend's share:
HTTP or gRPC, validation, rendering and tokenizing before; formatting and delivery after.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import httpx
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from bench.edge_vs_vllm import MODEL, ROOT, side_by_side, wait_http
from bench.tracing import Collector
from meshserve.inference.v1 import inference_pb2, inference_pb2_grpc

WORDS = "alpha bravo cedar delta ember fjord gamma harbor iris jade kelp lumen maple nova orbit pine".split()
ENGINE_TTFT = "vllm:time_to_first_token_seconds"


class SpanCollector(Collector):
    """An OTLP/gRPC trace endpoint that keeps every span: (trace id, service, name, start ns, end ns)."""

    def __init__(self) -> None:
        self.spans: list[tuple[bytes, str, str, int, int]] = []
        super().__init__()

    def received(self, request: bytes) -> None:
        message = trace_service_pb2.ExportTraceServiceRequest.FromString(request)
        for resource in message.resource_spans:
            attributes = resource.resource.attributes
            service = next((a.value.string_value for a in attributes if a.key == "service.name"), "?")
            for scope in resource.scope_spans:
                for span in scope.spans:
                    self.spans.append(
                        (span.trace_id, service, span.name, span.start_time_unix_nano, span.end_time_unix_nano)
                    )

    def timeline(self) -> list[str]:
        """Median start and end of each span, in ms from the start of its trace's first span."""
        traces: dict[bytes, list[tuple[str, str, int, int]]] = {}
        for trace_id, service, name, begin, end in self.spans:
            traces.setdefault(trace_id, []).append((service, name, begin, end))
        rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for spans in traces.values():
            if not any(name == "ingress" for _, name, _, _ in spans):
                continue  # not an edge request (a replica's Serve called directly)
            origin = min(b for _, _, b, _ in spans)
            seen: set[tuple[str, str]] = set()
            for service, name, begin, end in sorted(spans, key=lambda s: s[2]):
                if (service, name) in seen:
                    continue
                seen.add((service, name))
                rows.setdefault((service, name), []).append(((begin - origin) / 1e6, (end - origin) / 1e6))
        ordered = sorted(rows.items(), key=lambda kv: statistics.median(b for b, _ in kv[1]))
        lines = ["| service | span | traces | start ms | end ms |", "|---|---|---|---|---|"]
        for (service, name), spans in ordered:
            start = statistics.median(b for b, _ in spans)
            end = statistics.median(e for _, e in spans)
            lines.append(f"| {service} | {name} | {len(spans)} | {start:.2f} | {end:.2f} |")
        return lines


def engine_ttft_total(metrics_url: str) -> tuple[float, float]:
    """The sum and count of vLLM's engine time-to-first-token histogram on one server."""
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    values = {}
    for suffix in ("_sum", "_count"):
        match = re.search(rf"^{re.escape(ENGINE_TTFT + suffix)}\{{[^}}]*\}} (\S+)$", text, re.M)
        values[suffix] = float(match.group(1)) if match else 0.0
    return values["_sum"], values["_count"]


def body(prompt: str, max_tokens: int) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }


def first_content(event: str) -> bool:
    if not event.startswith("data: {"):
        return False
    chunk = json.loads(event[6:])
    return any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or [])


def http_ttft(client: httpx.Client, url: str, headers: dict[str, str], payload: dict[str, object]) -> float:
    start = time.perf_counter()
    ttft = float("nan")
    with client.stream("POST", url, json=payload, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if ttft != ttft and first_content(line):
                ttft = time.perf_counter() - start
    return ttft


def serve_ttft(stub: inference_pb2_grpc.InferenceServiceStub, payload: dict[str, object]) -> float:
    start = time.perf_counter()
    ttft = float("nan")
    opening = inference_pb2.ServeStart(
        request_id=f"probe-{random.getrandbits(64):x}",
        model=MODEL,
        endpoint=inference_pb2.ENDPOINT_CHAT_COMPLETIONS,
        body=json.dumps(payload).encode(),
        proceed=True,
    )
    for reply in stub.Serve(iter([inference_pb2.ServeRequest(start=opening)])):
        if ttft != ttft and reply.data and first_content(reply.data.decode().strip()):
            ttft = time.perf_counter() - start
    return ttft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=12, help="requests per target")
    parser.add_argument("--settle", type=float, default=1.5)
    parser.add_argument("--prompt-words", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--no-mtls", dest="mtls", action="store_false")
    parser.add_argument("--trace", action="store_true", help="trace every edge request and add the span timeline")
    parser.add_argument(
        "--no-guess", dest="guess", action="store_false", help="the router reserves after rendering only"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "reports" / "ttft_breakdown.md")
    args = parser.parse_args()
    started = time.time()
    collector = SpanCollector() if args.trace else None
    vllm, port, mesh = side_by_side(args.mtls, f"127.0.0.1:{collector.port}" if collector is not None else "")
    mesh.options.env["MESHSERVE_ROUTER_RESERVE_ON_GUESS"] = str(args.guess).lower()
    rng = random.Random(7)
    samples: dict[str, list[tuple[float, float]]] = {}
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", vllm, 600)
        mesh.start(timeout=600)
        replica = mesh.inference_replicas()[0]
        stub = inference_pb2_grpc.InferenceServiceStub(mesh.channel(replica, "router"))
        client = httpx.Client(timeout=60)
        key = {"authorization": f"Bearer {mesh.user_key}"}
        vllm_url = f"http://127.0.0.1:{port}"
        vllm_metrics = f"{vllm_url}/metrics"
        replica_metrics = f"http://127.0.0.1:{replica.metrics_port}/metrics"
        targets: dict[str, tuple[str, Callable[[dict[str, object]], float]]] = {
            "vllm-serve": (
                vllm_metrics,
                lambda p: http_ttft(client, f"http://127.0.0.1:{port}/v1/chat/completions", {}, p),
            ),
            "replica Serve": (replica_metrics, lambda p: serve_ttft(stub, p)),
            "edge": (replica_metrics, lambda p: http_ttft(client, f"{mesh.edge_url}/v1/chat/completions", key, p)),
        }
        for i in range(args.requests + 1):  # the first is an unrecorded warm-up
            if collector is not None and i == 1:
                collector.spans.clear()  # the warm-up's spans
            for name, (metrics_url, send) in targets.items():
                prompt = " ".join(rng.choice(WORDS) for _ in range(args.prompt_words))
                time.sleep(args.settle)
                before = engine_ttft_total(metrics_url)
                client_s = send(body(prompt, args.max_tokens))
                after = engine_ttft_total(metrics_url)
                count = after[1] - before[1]
                engine_s = (after[0] - before[0]) / count if count == 1 else float("nan")
                print(f"{name:<14} client {client_s * 1000:7.1f} ms  engine {engine_s * 1000:7.1f} ms", flush=True)
                if i:
                    samples.setdefault(name, []).append((client_s, engine_s))
    finally:
        mesh.stop()
        vllm.terminate()
        vllm.wait(30)
    text = report(samples, args, started)
    if collector is not None:
        collector.stop()
        text += (
            "\nSpans of the mesh, every request traced (medians over traces):\n\n"
            + "\n".join(collector.timeline())
            + "\n"
        )
    args.out.write_text(text)
    print(text)


def report(samples: dict[str, list[tuple[float, float]]], args: argparse.Namespace, started: float) -> str:
    def med(values: list[float]) -> float:
        return statistics.median(values) * 1000

    base = med([c for c, _ in samples["vllm-serve"]])
    lines = [
        "# Time to first token at concurrency 1, broken down",
        "",
        f"{args.requests} streamed chat requests per target, one at a time and interleaved, {args.prompt_words}"
        f" random words each (never a prefix-cache hit), max_tokens {args.max_tokens}, greedy, {args.settle} s"
        f" of quiet before each; mesh {'with' if args.mtls else 'without'} mutual TLS, the router reserving"
        f" {'on a guess while the prompt renders' if args.guess else 'after rendering only'}. The engine's time is"
        " vLLM's own vllm:time_to_first_token_seconds for that request (from its arrival in AsyncLLM to its"
        " first output); the frontend's is the rest of what the client waited. Medians in ms."
        f" Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, {time.time() - started:.0f} s.",
        "",
        "| target | client TTFT | engine TTFT | frontend (client - engine) | client TTFT / vLLM's |",
        "|---|---|---|---|---|",
    ]
    for name, rows in samples.items():
        client = med([c for c, _ in rows])
        engine = med([e for _, e in rows])
        frontend = med([c - e for c, e in rows])
        lines.append(f"| {name} | {client:.1f} | {engine:.1f} | {frontend:.1f} | {client / base:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
