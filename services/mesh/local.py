"""Starts inference, router and Envoy as child processes on free loopback ports; stops them in order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import yaml

from deploy.envoy.config import Address, EdgeConfig, Tracing
from deploy.envoy.config import write as write_envoy_config
from deploy.envoy.mesh_tls import write_sds
from meshserve.auth.v1 import auth_pb2, auth_pb2_grpc
from services.mesh.procs import (
    MeshError,
    MeshOptions,
    Proc,
    catalogue_entry,
    core_sets,
    envoy_binary,
    free_port,
    reap,
    redis_args,
    wait_http_ok,
    wait_redis,
)
from services.mesh.readiness import Readiness
from services.ratelimit.rules import FailureMode, Kind, Rules
from services.runtime import redis_tls, tls, tracing
from services.runtime.files import write_private

__all__ = [
    "LocalMesh",
    "MeshError",
    "MeshOptions",
    "Proc",
    "core_sets",
    "envoy_binary",
    "free_port",
    "reap",
    "wait_http_ok",
]


class LocalMesh(Readiness):
    """The processes of one local mesh."""

    def __init__(self, options: MeshOptions) -> None:
        self.options = options
        self.procs: dict[str, Proc] = {}
        self.edge = Address(options.host, options.edge_port or free_port(options.host))
        self.admin = Address(options.host, free_port(options.host))
        options.state_dir.mkdir(parents=True, exist_ok=True)
        # Certificates by identity, issued (or found fresh) once per mesh; test threads ask at once.
        self._identities: dict[str, tls.Files] = {}
        self._issuing = threading.Lock()

    @property
    def edge_url(self) -> str:
        return f"{'https' if self.options.edge_tls else 'http'}://{self.edge.host}:{self.edge.port}"

    @property
    def edge_ca(self) -> Path | None:
        """The CA a client of a TLS edge trusts (None for a plain HTTP edge)."""
        return self._issue("edge").ca if self.options.edge_tls else None

    def edge_channel(self) -> grpc.Channel:
        """A native gRPC channel to the edge, over TLS when the edge serves it."""
        return tls.edge_channel(f"{self.edge.host}:{self.edge.port}", self.edge_ca)

    def _spawn(self, name: str, args: list[str], env: dict[str, str], ready: bool = True, nice: int = 0) -> Proc:
        log = self.options.state_dir / f"{name}.log"
        ready_file = self.options.state_dir / f"{name}.ready.json" if ready else None
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
        # Locally the edge stops first, so a drain period would only delay Ctrl-C.
        drained = ("", "AUTH_", "RATELIMIT_", "BILLING_", "ROUTER_", "INFERENCE_")
        local = {**{f"MESHSERVE_{p}DRAIN_SECONDS": "0" for p in drained}, "HF_HUB_OFFLINE": "1"}
        inherited = {k: v for k, v in os.environ.items() if k not in tracing.ENDPOINT_VARIABLES}
        full_env = {**inherited, **local, **self.options.tracing_env(), **self.options.env, **env}
        if nice:
            # `nice` execs the command: same pid, and every thread it starts inherits the priority.
            args = ["nice", "-n", str(nice), *args]
        with log.open("wb") as out:
            popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        proc = Proc(name, popen, log, ready_file, args=args, env=env, nice=nice)
        self.procs[name] = proc
        return proc

    def start_service(
        self,
        name: str,
        module: str,
        env_prefix: str,
        env: dict[str, str] | None = None,
        nice: int = 0,
        kind: str = "",
    ) -> Proc:
        """Starts `python -m module`, a service on the shared runtime, bound to the mesh's host.

        kind is its mesh identity (by default the package under services/); with mtls it serves and
        calls with that identity's certificate."""
        kind = kind or module.split(".")[1]
        ready = str((self.options.state_dir / f"{name}.ready.json").resolve())
        base = {env_prefix + "HOST": self.options.host, env_prefix + "READY_FILE": ready}
        files = self.identity(kind)
        certs = files.env(env_prefix) if files is not None else {}
        proc = self._spawn(name, [sys.executable, "-m", module], {**base, **certs, **(env or {})}, nice=nice)
        proc.port_env, proc.kind = env_prefix + "PORT", kind
        return proc

    def identity(self, name: str) -> tls.Files | None:
        """The certificate files of a mesh identity (made on first use), or None with mtls off."""
        return self._issue(name) if self.options.mtls else None

    def _issue(self, name: str) -> tls.Files:
        with self._issuing:
            if name not in self._identities:
                self._identities[name] = tls.issue(self.options.state_dir / "tls", name)
            return self._identities[name]

    def channel(self, name: str | Proc, caller: str) -> grpc.Channel:
        """A channel to a service of this mesh (by name or process), calling as the mesh identity `caller`."""
        proc = self.procs[name] if isinstance(name, str) else name
        return tls.channel(f"{self.options.host}:{proc.grpc_port}", self.identity(caller), proc.kind)

    def restart(self, name: str, timeout: float = 60) -> Proc:
        """Stops a service and starts it again on the same port, as a Kubernetes Service address stays put."""
        self.stop_proc(self.procs[name])
        proc = self.respawn(self.procs[name])
        self.wait_serving(proc, timeout)
        return proc

    def respawn(self, old: Proc) -> Proc:
        """Starts a stopped or dead process again as it was started, on the same port; does not wait."""
        reap(old)
        env = {**old.env, old.port_env: str(old.grpc_port)} if old.port_env else old.env
        # old.args already hold the nice prefix.
        proc = self._spawn(old.name, old.args, env, ready=old.ready_file is not None, nice=0)
        proc.port_env, proc.grpc_port, proc.kind = old.port_env, old.grpc_port, old.kind
        return proc

    def start_redis(self, port: int = 0) -> Proc:
        """A private redis-server on a free (or the given) port, persisting to the state folder (append-only)."""
        port = port or free_port(self.options.host)
        files = self.identity("redis") if self.options.redis_tls else None
        args = redis_args(self.options.host, port, self.options.state_dir / "redis", files)
        proc = self._spawn("redis", args, {}, ready=False)
        proc.grpc_port = port
        wait_redis(self.redis_url, self.identity("admin"), lambda: self._check_alive(proc), timeout=20)
        return proc

    @property
    def redis_url(self) -> str:
        """The mesh's Redis: TLS (rediss) with mutual TLS on, its clients presenting their mesh certificates."""
        scheme = "rediss" if self.options.mtls and self.options.redis_tls else "redis"
        return f"{scheme}://{self.options.host}:{self.procs['redis'].grpc_port}/0"

    def redis_options(self, caller: str = "admin") -> dict[str, Any]:
        """What a redis-py client of this mesh's Redis (a test's, a tool's) passes to from_url, as `caller`."""
        return redis_tls.options(self.redis_url, self.identity(caller))

    @property
    def admin_key_file(self) -> Path:
        return self.options.state_dir / "admin-key.json"

    def start_auth(self, name: str = "auth", env: dict[str, str] | None = None) -> Proc:
        """Starts an auth replica on the mesh's Redis; the first one creates the bootstrap admin key."""
        base = {
            "MESHSERVE_AUTH_REDIS_URL": self.redis_url,
            "MESHSERVE_AUTH_BOOTSTRAP_ADMIN_FILE": str(self.admin_key_file.resolve()),
        }
        return self.start_service(name, "services.auth", "MESHSERVE_AUTH_", {**base, **(env or {})})

    def start_ratelimit(self, name: str = "ratelimit", rules: Path | None = None) -> Proc:
        """Starts a rate-limit replica on the mesh's Redis."""
        env = {
            "MESHSERVE_RATELIMIT_REDIS_URL": self.redis_url,
            "MESHSERVE_RATELIMIT_RULES": str((rules or self.options.ratelimit_rules).resolve()),
            "MESHSERVE_RATELIMIT_PRICES": str(self.options.prices.resolve()),
        }
        return self.start_service(name, "services.ratelimit", "MESHSERVE_RATELIMIT_", env)

    def start_billing(self, name: str = "billing", env: dict[str, str] | None = None) -> Proc:
        """Starts a billing replica on the mesh's Redis, with its SQLite ledger in the state folder
        unless env names another (MESHSERVE_BILLING_LEDGER_DSN)."""
        base = {
            "MESHSERVE_BILLING_REDIS_URL": self.redis_url,
            "MESHSERVE_BILLING_LEDGER": str((self.options.state_dir / "billing" / "ledger.sqlite").resolve()),
            "MESHSERVE_BILLING_PRICES": str(self.options.prices.resolve()),
        }
        return self.start_service(name, "services.billing", "MESHSERVE_BILLING_", {**base, **(env or {})})

    def _fail_open(self, kind: Kind) -> bool:
        return Rules.from_yaml(self.options.ratelimit_rules).failure_mode(kind) is FailureMode.OPEN

    def start_inference(self, name: str = "inference", cpu_bind: str = "auto", model: str = "") -> Proc:
        """Starts an inference replica of model (the mesh's chat model unless given); it serves once the
        model is loaded and warmed up. cpu_bind is vLLM's VLLM_CPU_OMP_THREADS_BIND (see core_sets)."""
        prefix = "MESHSERVE_INFERENCE_"
        env = {
            "VLLM_CPU_OMP_THREADS_BIND": cpu_bind,
            prefix + "MODEL": model or self.options.model,
            prefix + "MODEL_STORE": str(self.options.model_store.resolve()),
            prefix + "DTYPE": self.options.dtype,
            # An embedding model runs with its own context (it is shorter than a chat model's).
            prefix + "MAX_MODEL_LEN": str(0 if model else self.options.max_model_len),
            prefix + "KV_CACHE_DTYPE": "auto" if model else self.options.kv_cache_dtype,
            prefix + "CACHE_DIR": str((self.options.state_dir / "vllm-cache").resolve()),
        }
        return self.start_service(name, "services.inference", prefix, env)

    def inference_replicas(self) -> list[Proc]:
        """The inference replicas started so far, in order."""
        return [p for name, p in self.procs.items() if name == "inference" or name.startswith("inference-")]

    def start_router(
        self,
        name: str = "router",
        replicas: list[str] | None = None,
        require_caller: bool = True,
        env: dict[str, str] | None = None,
        required_for_ready: bool = True,
    ) -> Proc:
        """Starts a router whose catalogue points the model at the given (or the running) replicas.

        It reports SERVING once the model has a replica in rotation, unless required_for_ready is off."""
        if replicas is None:
            replicas = [f"{self.options.host}:{p.grpc_port}" for p in self.inference_replicas()]
        models = [
            catalogue_entry(
                self.options.model, replicas, required_for_ready, self.options.kv_cache_dtype, self.options.cache
            )
        ]
        embed = self.procs.get("embed")
        if embed is not None and self.options.embedding_model:
            embedders = [f"{self.options.host}:{embed.grpc_port}"]
            models.append(catalogue_entry(self.options.embedding_model, embedders, required_for_ready))
        catalogue = self.options.state_dir / f"{name}.catalogue.yaml"
        catalogue.write_text(yaml.safe_dump({"models": models}))
        settings = {
            "MESHSERVE_ROUTER_CATALOGUE": str(catalogue),
            "MESHSERVE_ROUTER_REQUIRE_CALLER": str(require_caller),
        }
        if "auth" in self.procs and require_caller:  # generation's API keys checked in the router (the edge skips)
            settings["MESHSERVE_ROUTER_AUTH_REDIS_URL"] = self.redis_url
        if "redis" in self.procs:  # the Responses API's stored responses, and the response cache
            settings["MESHSERVE_ROUTER_RESPONSES_REDIS_URL"] = self.redis_url
            settings["MESHSERVE_ROUTER_CACHE_REDIS_URL"] = self.redis_url
        billing = self.procs.get("billing")
        if billing is not None:
            settings["MESHSERVE_ROUTER_BILLING"] = f"{self.options.host}:{billing.grpc_port}"
            settings["MESHSERVE_ROUTER_USAGE_SPOOL"] = str((self.options.state_dir / "spool" / name).resolve())
        ratelimit = self.procs.get("ratelimit")
        if ratelimit is not None:  # generation's limits decided in the router, on the service's Redis and rules
            settings["MESHSERVE_ROUTER_LIMITS_REDIS_URL"] = self.redis_url
            settings["MESHSERVE_ROUTER_LIMITS_RULES"] = ratelimit.env["MESHSERVE_RATELIMIT_RULES"]
            settings["MESHSERVE_ROUTER_LIMITS_PRICES"] = ratelimit.env["MESHSERVE_RATELIMIT_PRICES"]
        return self.start_service(
            name, "services.router", "MESHSERVE_ROUTER_", {**settings, **(env or {})}, nice=self.options.support_nice
        )

    def start_envoy(self) -> Proc:
        """Writes the edge config for the running router and starts Envoy on it."""
        router = self.procs["router"]
        auth = self.procs.get("auth")
        ratelimit = self.procs.get("ratelimit")
        billing = self.procs.get("billing")
        # One SDS folder serves both: the edge's mesh certificate and the one its clients see.
        sds = self.options.state_dir / "tls" / "edge-sds"
        if self.options.mtls or self.options.edge_tls:
            write_sds(self._issue("edge"), sds)
        config = write_envoy_config(
            EdgeConfig(
                listen=self.edge,
                admin=self.admin,
                router=Address(self.options.host, router.grpc_port),
                auth=Address(self.options.host, auth.grpc_port) if auth is not None else None,
                router_checks_keys=bool(router.env.get("MESHSERVE_ROUTER_AUTH_REDIS_URL")),
                ratelimit=Address(self.options.host, ratelimit.grpc_port) if ratelimit is not None else None,
                ratelimit_fail_closed=ratelimit is not None and not self._fail_open(Kind.REQUESTS),
                billing=Address(self.options.host, billing.grpc_port) if billing is not None else None,
                tracing=Tracing(Address.parse(self.options.otlp_endpoint), self.options.trace_sample_ratio * 100)
                if self.options.otlp_endpoint
                else None,
                mesh_sds=sds if self.options.mtls else None,
                edge_sds=sds if self.options.edge_tls else None,
            ),
            self.options.state_dir / "envoy.yaml",
        )
        args = [
            envoy_binary(),
            "-c",
            str(config),
            "--log-level",
            "warn",
            "--concurrency",
            "1",
            "--base-id",
            str(self.edge.port),
            # Access log lines reach the log file within a second (Envoy's default is 10 s).
            "--file-flush-interval-msec",
            "1000",
        ]
        return self._spawn("envoy", args, {}, ready=False, nice=self.options.support_nice)

    def start(self, timeout: float = 600, tick: Callable[[], None] | None = None) -> None:
        """Starts the whole mesh and waits until the edge serves and a first user key exists."""
        self.start_redis()
        auth = self.start_auth()
        ratelimit = self.start_ratelimit()
        billing = self.start_billing()
        binds = core_sets(self.options.replicas)
        replicas = [
            self.start_inference("inference" if i == 0 else f"inference-{i + 1}", binds[i])
            for i in range(self.options.replicas)
        ]
        if self.options.embedding_model:  # beside the chat replicas, on every core (it idles between calls)
            replicas.append(self.start_inference("embed", "auto", self.options.embedding_model))
        for inference in replicas:
            self.wait_bound(inference, 120)
        self.wait_bound(ratelimit, 60)
        self.wait_bound(billing, 60)
        router = self.start_router()
        self.wait_serving(auth, 60)
        self.wait_serving(ratelimit, 60)
        self.wait_serving(billing, 60)
        self.wait_bound(router, 60)
        self.start_envoy()
        self.wait_edge(30)
        self.ensure_user_key()
        for inference in replicas:
            self.wait_serving(inference, timeout, tick)
        # The router serves once a replica is in rotation, so after the engines.
        self.wait_serving(router, 60)
        self.wait_routable(router, replicas, 30)

    @property
    def admin_key(self) -> str:
        return str(json.loads(self.admin_key_file.read_text())["secret"])

    @property
    def user_key_file(self) -> Path:
        return self.options.state_dir / "first-key.json"

    @property
    def user_key(self) -> str:
        return str(json.loads(self.user_key_file.read_text())["secret"])

    def admin_stub(
        self,
    ) -> tuple[grpc.Channel, auth_pb2_grpc.AuthAdminServiceStub, tuple[tuple[str, str | bytes], ...]]:
        """The admin API through the edge, and the metadata that authenticates as the admin key."""
        channel = self.edge_channel()
        return channel, auth_pb2_grpc.AuthAdminServiceStub(channel), (("authorization", f"Bearer {self.admin_key}"),)

    def ensure_user_key(self) -> None:
        """Keeps the first user key if it still works; otherwise creates one (tenant "default", all models)."""
        channel, stub, auth = self.admin_stub()
        with channel:
            if self.user_key_file.exists():
                key_id = json.loads(self.user_key_file.read_text())["key_id"]
                try:
                    key = stub.GetKey(auth_pb2.GetKeyRequest(key_id=key_id), metadata=auth, timeout=10).key
                    if not key.HasField("revoked_at"):
                        return
                except grpc.RpcError:
                    pass
            created = stub.CreateKey(
                auth_pb2.CreateKeyRequest(tenant="default", label="first key"), metadata=auth, timeout=10
            )
        write_private(self.user_key_file, {"key_id": created.key.key_id, "secret": created.secret})

    def stop_proc(self, proc: Proc, timeout: float = 30) -> int:
        """SIGTERM, then SIGKILL after timeout; returns the exit code. Nothing it started outlives it."""
        if proc.alive():
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()
        reap(proc)
        if proc.ready_file is not None:
            proc.ready_file.unlink(missing_ok=True)  # `meshserve top` and `usage` find running services by it
        return int(proc.popen.returncode)

    def stop(self, timeout: float = 30) -> None:
        """Stops the edge first, then the router, then the engines: nothing accepts work it cannot finish."""
        for proc in reversed(list(self.procs.values())):
            self.stop_proc(proc, timeout)
