"""The shared runtime in a real process: readiness from warm-up, reflection, metrics, drain on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.runtime import keepalive

ROOT = Path(__file__).resolve().parents[2]


class Sample:
    def __init__(self, tmp: Path, drain: float, **extra_env: str) -> None:
        self.gate = tmp / "gate"
        self.ready = tmp / "ready.json"
        env = {
            **os.environ,
            "SAMPLE_GATE": str(self.gate),
            "MESHSERVE_READY_FILE": str(self.ready),
            "MESHSERVE_DRAIN_SECONDS": str(drain),
            "MESHSERVE_GRACE_SECONDS": "5",
            **extra_env,
        }
        self.log = tmp / "sample.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.integration.sample_service"], cwd=ROOT, env=env, stdout=out, stderr=out
            )
        deadline = time.monotonic() + 30
        while not self.ready.exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ports = json.loads(self.ready.read_text())
        self.target = f"127.0.0.1:{ports['grpc_port']}"
        self.metrics_port = ports["metrics_port"]

    def health(self, service: str = "") -> int:
        with grpc.insecure_channel(self.target) as channel:
            return int(
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                .status
            )


@pytest.fixture
def sample(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Sample]:
    s = Sample(tmp_path, getattr(request, "param", 0.0))
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait()


def wait_status(sample: Sample, status: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while sample.health() != status:
        assert time.monotonic() < deadline, f"health never became {status}"
        time.sleep(0.05)


def test_not_serving_until_warm_up_is_done_then_serving(sample: Sample) -> None:
    assert sample.health() == health_pb2.HealthCheckResponse.NOT_SERVING
    assert sample.health("meshserve.sample.v1.SampleService") == health_pb2.HealthCheckResponse.NOT_SERVING
    sample.gate.write_text("go")
    wait_status(sample, health_pb2.HealthCheckResponse.SERVING)
    assert sample.health("meshserve.sample.v1.SampleService") == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(sample: Sample) -> None:
    with grpc.insecure_channel(sample.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"meshserve.sample.v1.SampleService", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint_exports_rpc_counts(sample: Sample) -> None:
    sample.health()
    with urllib.request.urlopen(f"http://127.0.0.1:{sample.metrics_port}/metrics", timeout=5) as r:
        body = r.read().decode()
    assert 'meshserve_rpc_requests_total{code="OK",method="Check",service="sample"}' in body


@pytest.mark.parametrize("sample", [1.5], indirect=True)
def test_sigterm_drains_not_serving_first_then_exits_cleanly(sample: Sample) -> None:
    sample.gate.write_text("go")
    wait_status(sample, health_pb2.HealthCheckResponse.SERVING)
    sample.proc.send_signal(signal.SIGTERM)
    # During the drain the server still answers, and says NOT_SERVING so balancers move away.
    wait_status(sample, health_pb2.HealthCheckResponse.NOT_SERVING, timeout=1.0)
    assert sample.proc.poll() is None
    assert sample.proc.wait(15) == 0
    log = sample.log.read_text()
    assert '"msg": "draining"' in log and '"msg": "stopped"' in log


def test_a_failed_warm_up_exits_non_zero(sample: Sample) -> None:
    sample.gate.write_text("fail")
    assert sample.proc.wait(15) == 1
    assert "warm-up failed" in sample.log.read_text()


def test_a_client_pinging_like_envoy_keeps_its_stream(tmp_path: Path) -> None:
    # Envoy pings its upstreams on a fixed interval whether or not data flows. A gRPC server with
    # default settings answers the third such ping with GOAWAY too_many_pings, failing every call
    # on the connection; the runtime permits pings at half the interval the mesh's clients use.
    sample = Sample(tmp_path, 0.0, MESHSERVE_KEEPALIVE_SECONDS="1")
    try:
        envoy_like = [
            *keepalive.channel_options(1),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        with grpc.insecure_channel(sample.target, options=envoy_like) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
            with pytest.raises(grpc.RpcError) as ended:
                for _ in watch:
                    pass
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, ended.value.details()
    finally:
        sample.proc.kill()
        sample.proc.wait()


def _serving_line(sample: Sample) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in sample.log.read_text().splitlines() if line.startswith("{")]
        if serving := [line for line in lines if line.get("msg") == "serving"]:
            return serving[0]
        assert time.monotonic() < deadline, sample.log.read_text()
        time.sleep(0.05)


def test_the_start_up_heap_is_frozen_once_warm_and_every_pause_is_timed(sample: Sample) -> None:
    sample.gate.write_text("go")
    wait_status(sample, health_pb2.HealthCheckResponse.SERVING)
    assert int(str(_serving_line(sample)["gc_frozen_objects"])) > 10_000
    with urllib.request.urlopen(f"http://127.0.0.1:{sample.metrics_port}/metrics", timeout=5) as r:
        body = r.read().decode()
    # The freeze's own full collection, timed like any other.
    full = [line for line in body.splitlines() if line.startswith("meshserve_gc_pause_seconds_count")]
    sample_full = [line for line in full if 'generation="2"' in line and 'service="sample"' in line]
    assert sample_full and float(sample_full[0].split()[-1]) >= 1


def test_the_freeze_can_be_turned_off(tmp_path: Path) -> None:
    sample = Sample(tmp_path, 0.0, MESHSERVE_GC_FREEZE="false")
    try:
        sample.gate.write_text("go")
        wait_status(sample, health_pb2.HealthCheckResponse.SERVING)
        assert _serving_line(sample)["gc_frozen_objects"] == 0
    finally:
        sample.proc.kill()
        sample.proc.wait()
