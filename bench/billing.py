"""What billing costs: usage records/s one billing process ingests into Redis, and what recording adds to a request.

Part 1 streams batches of 256 usage records (fresh request ids, 50 keys over 5 tenants) from separate
client processes into one billing replica on real Redis, as the routers do, and reports records/s of
wall time and the replica's CPU time per record (from /proc). A check at the end reads the ledger
back: every record sent must be there, once.

Part 2 runs two routers over the same scripted replica (4 tokens, no engine time), one recording usage
to billing and one not, and sends the same unary chat request to each in alternating rounds, at
concurrency 1 and 8. The p50 difference is what recording adds to a request.
"""

from __future__ import annotations

import argparse
import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from bench.loadgen import bench_state, median, percentile, write_report
from bench.ratelimit import cpu_seconds
from meshserve.billing.v1 import billing_pb2, billing_pb2_grpc
from meshserve.llm.v1 import llm_pb2, llm_pb2_grpc
from services.mesh.local import LocalMesh, MeshOptions
from services.runtime.identity import KEY_ID_HEADER, TENANT_HEADER
from tests.integration import scripted_inference

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
BATCH = 256
# Requests per router per block in part 2.
BLOCK = 50


def _batches(worker: int, round_: int, records: int) -> list[billing_pb2.RecordUsageRequest]:
    out = []
    for start in range(0, records, BATCH):
        batch = billing_pb2.RecordUsageRequest()
        for i in range(start, min(start + BATCH, records)):
            r = batch.records.add(
                request_id=f"bench-{round_}-{worker}-{i}",
                tenant=f"tenant_{i % 5}",
                key_id=f"key_{i % 50}",
                model=MODEL,
                version="v1",
                prompt_tokens=100 + i % 37,
                completion_tokens=20 + i % 11,
                outcome=billing_pb2.OUTCOME_COMPLETED,
                ttft_seconds=0.05,
                total_seconds=0.4,
            )
            r.finished_at.GetCurrentTime()
        out.append(batch)
    return out


def _send(args: tuple[str, int, int, int]) -> tuple[int, float]:
    """One client: builds its batches first, then streams them on one RecordUsage call; (accepted, seconds)."""
    target, worker, round_, records = args
    batches = _batches(worker, round_, records)
    with grpc.insecure_channel(target) as channel:
        stub = billing_pb2_grpc.BillingServiceStub(channel)
        start = time.perf_counter()
        reply = stub.RecordUsage(iter(batches), timeout=300)
        return reply.accepted, time.perf_counter() - start


def ingest(target: str, pid: int, round_: int, clients: int, records: int) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(clients) as pool:
        # Clients build their records before the clock starts: they wait on a barrier-free warm call.
        pool.map(_send, [(target, w, -1 - round_, BATCH) for w in range(clients)])
        cpu0 = cpu_seconds(pid)
        results = pool.map(_send, [(target, w, round_, records) for w in range(clients)])
        cpu = cpu_seconds(pid) - cpu0
    accepted = sum(a for a, _ in results)
    # Each client's own stream time leaves out its record building.
    stream_wall = max(s for _, s in results)
    return {
        "accepted": accepted,
        "per_s": accepted / stream_wall,
        "cpu_us": cpu / accepted * 1e6,
        "per_cpu_s": accepted / cpu,
    }


def ledger_requests(target: str, timeout: float = 60) -> int:
    """Requests in the ledger once it stops growing (flushes run every second)."""
    last, deadline = -1, time.monotonic() + timeout
    while time.monotonic() < deadline:
        with grpc.insecure_channel(target) as channel:
            reply = billing_pb2_grpc.BillingServiceStub(channel).GetUsage(billing_pb2.GetUsageRequest(), timeout=30)
        total = sum(line.requests for line in reply.lines)
        if total == last:
            return total
        last = total
        time.sleep(2.5)
    return last


def latencies(target: str, concurrency: int, requests: int) -> list[float]:
    identity = ((TENANT_HEADER, "bench"), (KEY_ID_HEADER, "key_bench"))
    request = llm_pb2.CreateChatCompletionRequest(
        params=llm_pb2.ChatCompletionParams(model=MODEL, messages=[llm_pb2.ChatMessage(role="user", content="hi")])
    )
    out: list[float] = []
    lock = threading.Lock()
    with grpc.insecure_channel(target) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)

        def one(_: int) -> None:
            start = time.perf_counter()
            stub.CreateChatCompletion(request, metadata=identity, timeout=30)
            with lock:
                out.append((time.perf_counter() - start) * 1000)

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(requests)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=40_000, help="records per client per round")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300, help="requests per router per round (part 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "reports" / "billing.md")
    args = parser.parse_args()
    state = bench_state("bench-billing")
    # Billing measured alone, dialled directly: plaintext, like the numbers on record.
    mesh = LocalMesh(MeshOptions(state_dir=state, model=MODEL, model_store=Path("unused"), mtls=False))
    started = time.time()
    rounds: list[dict[str, float]] = []
    lat: dict[tuple[str, int], list[float]] = {}
    cpu = {"billing on": 0.0, "billing off": 0.0}
    try:
        mesh.start_redis()
        billing = mesh.start_billing()
        mesh.wait_serving(billing, 30)
        target = f"127.0.0.1:{billing.grpc_port}"
        for round_ in range(args.rounds):
            r = ingest(target, billing.popen.pid, round_, args.clients, args.records)
            rounds.append(r)
            print(
                f"ingest round {round_ + 1}: {r['per_s']:8.0f} records/s  {r['cpu_us']:5.1f} µs CPU each"
                f"  {r['per_cpu_s']:8.0f}/CPU-s"
            )
        sent = args.rounds * args.clients * args.records
        warm = args.rounds * args.clients * BATCH
        in_ledger = ledger_requests(target)
        print(f"ledger: {in_ledger} requests for {sent + warm} records sent")

        replica = scripted_inference.start(mesh, "bench", 4, 0)
        mesh.wait_serving(replica, 30)
        replicas = [f"127.0.0.1:{replica.grpc_port}"]
        recording = mesh.start_router("router", replicas=replicas, require_caller=False)
        plain = mesh.start_router(
            "router-plain", replicas=replicas, require_caller=False, env={"MESHSERVE_ROUTER_BILLING": ""}
        )
        for proc in (recording, plain):
            mesh.wait_serving(proc, 60)
            mesh.wait_routable(proc, [replica], 30)
        routers = {"billing on": recording, "billing off": plain}
        for proc in routers.values():
            latencies(f"127.0.0.1:{proc.grpc_port}", 8, 100)  # warm-up
        # Small blocks, alternating, the order flipped every block: both routers see the same noise.
        order = list(routers.items())
        for block in range(args.rounds * args.requests // BLOCK):
            for concurrency in (1, 8):
                for name, proc in order if block % 2 == 0 else order[::-1]:
                    cpu0 = cpu_seconds(proc.popen.pid)
                    got = latencies(f"127.0.0.1:{proc.grpc_port}", concurrency, BLOCK)
                    cpu[name] += cpu_seconds(proc.popen.pid) - cpu0
                    lat.setdefault((name, concurrency), []).extend(got)
        billed = ledger_requests(target) - in_ledger
    finally:
        mesh.stop()

    lines = [
        "# Billing: ingest rate and what recording adds to a request",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC by `python -m bench.billing` on this"
        " machine (2 cores, shared by the clients, Redis and the billing replica). Ratios and differences are",
        "taken side by side in one run.",
        "",
        f"## Ingest: {args.clients} client processes, batches of {BATCH}, {args.records:,} records each per round",
        "",
        "| round | records/s | billing CPU per record | records per billing CPU-second |",
        "|---|---|---|---|",
        *(
            f"| {i + 1} | {r['per_s']:,.0f} | {r['cpu_us']:.1f} µs | {r['per_cpu_s']:,.0f} |"
            for i, r in enumerate(rounds)
        ),
        "",
        f"Median: **{median([r['per_s'] for r in rounds]):,.0f} records/s** (target ≥ 20,000), "
        f"{median([r['per_cpu_s'] for r in rounds]):,.0f} records per CPU-second of the billing process.",
        f"Ledger check: {in_ledger:,} requests in the ledger for {sent + warm:,} records sent "
        f"({'exact' if in_ledger == sent + warm else 'MISMATCH'}).",
        "",
        f"## Request latency through a router, billing on vs off ({args.rounds * args.requests} unary requests per"
        f" router and concurrency, in alternating blocks of {BLOCK})",
        "",
        "| concurrency | p50 off | p50 on | p50 added | p99 off | p99 on |",
        "|---|---|---|---|---|---|",
    ]
    for concurrency in (1, 8):
        off, on = lat[("billing off", concurrency)], lat[("billing on", concurrency)]
        p50_off, p50_on = percentile(off, 50), percentile(on, 50)
        lines.append(
            f"| {concurrency} | {p50_off:.2f} ms | {p50_on:.2f} ms | {p50_on - p50_off:+.2f} ms "
            f"({p50_on / p50_off:.2f}x) | {percentile(off, 99):.2f} ms | {percentile(on, 99):.2f} ms |"
        )
    per_request = {name: seconds / len(lat[(name, 1)] + lat[(name, 8)]) * 1e6 for name, seconds in cpu.items()}
    lines += [
        "",
        f"Router CPU per request: {per_request['billing off']:.0f} µs off, {per_request['billing on']:.0f} µs on "
        f"(difference {per_request['billing on'] - per_request['billing off']:+.0f} µs: building, queueing and"
        " sending a record, within the noise of this shared machine).",
        "",
        f"The recording router's requests all reached the ledger: {billed:,} of "
        f"{len(lat[('billing on', 1)]) + len(lat[('billing on', 8)]) + 100:,} (warm-up included).",
        "",
        "Recording is off the request's path: the router queues the record and a background task sends",
        "batches (256 records or 100 ms) on a client stream, so a request never waits on billing.",
    ]
    write_report(lines, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
