"""What a streamed event costs in grpc.aio on this machine, on each end of one hop, as the mesh sends them now
(one message on its own stream per token) against one stream that carries every stream's event of a step
together (the multiplexed hop the router and a replica would need for a token to cost one message per step).

A server process (uvloop, as every service runs) plays the engine's side: every `--step-ms` a step makes one
event of `--event-bytes` for each of `--streams` streams, `--events` steps in all. "per stream" sends each
event as its own message on its stream's call; "multiplexed" sends each step's events as one message on one
call. The client (this process, uvloop) reads them all. On-CPU time of both processes (/proc schedstat) per
event, alternated in rounds, medians; idle CPU measured in the quiet before each round taken off.

    python -m bench.grpc_messages [--streams 64] [--events 64] [--step-ms 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import time
from pathlib import Path
from typing import Any

import grpc
import uvloop
from grpc import aio

from bench.loadgen import write_report
from bench.wakeups import idle_ms_per_s, on_cpu_ms
from services.mesh.local import free_port

ROOT = Path(__file__).resolve().parents[1]
METHOD = "/bench.Events/Stream"
MODES = ("per stream", "multiplexed")


def _serve(port: int, ready: Any) -> None:
    async def stream(request: bytes, context: aio.ServicerContext) -> object:
        streams, events, step_ms, size = (int(x) for x in request.split(b":"))
        payload = b"x" * size * streams
        for _ in range(events):
            await asyncio.sleep(step_ms / 1000)
            yield payload

    async def main() -> None:
        server = aio.server()
        handler = grpc.unary_stream_rpc_method_handler(stream)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Events", {"Stream": handler}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    uvloop.run(main())


async def _round(channel: aio.Channel, mode: str, args: argparse.Namespace, server: int) -> dict[str, float]:
    """µs per event on each end, above the idle CPU of the quiet before it."""
    pids = {"sender": server, "receiver": os.getpid()}
    idle = await idle_ms_per_s(pids, args.settle)
    call = channel.unary_stream(METHOD)
    calls, streams = (args.streams, 1) if mode == "per stream" else (1, args.streams)

    async def read(request: bytes) -> int:
        return sum([1 async for _ in call(request)])

    request = f"{streams}:{args.events}:{args.step_ms}:{args.event_bytes}".encode()
    before = {n: on_cpu_ms(p) for n, p in pids.items()}
    started = time.perf_counter()
    messages = sum(await asyncio.gather(*(read(request) for _ in range(calls))))
    wall = time.perf_counter() - started
    assert messages == calls * args.events, messages
    events = args.streams * args.events
    return {n: (on_cpu_ms(p) - before[n] - idle[n] * wall) * 1000 / events for n, p in pids.items()}


async def _measure(args: argparse.Namespace, port: int, server: int) -> dict[str, list[dict[str, float]]]:
    rows: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        for mode in MODES:  # warm up
            await _round(channel, mode, argparse.Namespace(**{**vars(args), "events": 4, "settle": 0.1}), server)
        for i in range(args.rounds):
            for mode in MODES if i % 2 == 0 else MODES[::-1]:
                rows[mode].append(await _round(channel, mode, args, server))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--events", type=int, default=64, help="steps, each an event for every stream")
    parser.add_argument("--step-ms", type=int, default=20)
    parser.add_argument("--event-bytes", type=int, default=200, help="about one token's SSE event")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "reports" / "grpc_messages.md")
    args = parser.parse_args()
    started = time.time()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    port = free_port()
    process = ctx.Process(target=_serve, args=(port, ready), daemon=True)
    process.start()
    try:
        if not ready.wait(30):
            raise SystemExit("the server did not start")
        assert process.pid is not None
        rows = uvloop.run(_measure(args, port, process.pid))
    finally:
        process.terminate()
        process.join()

    def med(mode: str, end: str) -> float:
        return statistics.median(r[end] for r in rows[mode])

    lines = [
        "# One hop of streamed events in grpc.aio: a message per event, or one per step",
        "",
        f"{args.streams} streams, {args.events} steps {args.step_ms} ms apart, an event of {args.event_bytes} "
        f"bytes per stream and step; uvloop on both ends, plaintext on 127.0.0.1; {args.rounds} rounds alternated; "
        f"on-CPU µs per event above idle (/proc schedstat), medians. Machine: 2 cores, shared. "
        f"Ran {time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC for {time.time() - started:.0f} s.",
        "",
        "| hop | sender µs per event | receiver µs per event |",
        "|---|---|---|",
    ]
    lines += [f"| {mode} | {med(mode, 'sender'):.1f} | {med(mode, 'receiver'):.1f} |" for mode in MODES]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
