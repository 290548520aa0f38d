"""Starts a service: grpc.aio server, health, reflection, metrics, logs, and a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import uvloop
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.runtime import files, gc_heap, keepalive, tls, tracing
from services.runtime.identity import METADATA_BYTES
from services.runtime.interceptors import ServiceInterceptor
from services.runtime.logs import configure_logging
from services.runtime.metrics import serve_metrics
from services.runtime.settings import ServiceSettings

log = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]


class Runtime:
    """What a service's setup gets: the server to register on, and readiness and shutdown hooks."""

    def __init__(self, name: str, settings: ServiceSettings, service_names: Sequence[str]) -> None:
        self.name = name
        self.settings = settings
        self.service_names = list(service_names)
        # Mutual TLS files, or None for plaintext; the service's own clients take their credentials here.
        self.tls = settings.tls_files()
        self.server = aio.server(
            interceptors=[ServiceInterceptor(name, identities=self.tls is not None)],
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
                # Above the edge's header limit: an oversized header is the edge's 431, never a 429 from here.
                ("grpc.max_metadata_size", METADATA_BYTES),
                *keepalive.server_options(settings.keepalive_seconds),
            ],
        )
        self.health = health.aio.HealthServicer()
        # Set when the drain begins: endless streams (load reports) end then, instead of holding the grace period.
        self.draining = asyncio.Event()
        self._warmups: list[Hook] = []
        self._shutdown_hooks: list[Hook] = []

    def warm_up_with(self, hook: Hook) -> None:
        """Runs hook after the server starts; the service turns SERVING only when all hooks succeed."""
        self._warmups.append(hook)

    def on_shutdown(self, hook: Hook) -> None:
        """Runs hook after the server has stopped, in reverse order of registration."""
        self._shutdown_hooks.append(hook)

    async def set_serving(self, serving: bool) -> None:
        """Sets the health of the whole server and of each of its services."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)


async def _run(
    name: str,
    settings: ServiceSettings,
    service_names: Sequence[str],
    setup: Callable[[Runtime], Awaitable[None]],
) -> None:
    gc_heap.time_pauses(name)
    rt = Runtime(name, settings, service_names)
    health_pb2_grpc.add_HealthServicer_to_server(rt.health, rt.server)
    await rt.set_serving(False)
    await setup(rt)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        rt.server,
    )
    address = f"{settings.host}:{settings.port}"
    if rt.tls is not None:
        port = rt.server.add_secure_port(address, tls.server_credentials(rt.tls))
    else:
        log.warning("mutual TLS is OFF: plaintext gRPC, callers unauthenticated (set the tls_* settings)")
        port = rt.server.add_insecure_port(address)
    metrics_port = serve_metrics(settings.host, settings.metrics_port) if settings.metrics_port >= 0 else -1
    probes = _health_server(rt, settings) if settings.health_port >= 0 else None
    await rt.server.start()
    if probes is not None:
        await probes[0].start()
    log.info(
        "listening",
        extra={
            "grpc_port": port,
            "metrics_port": metrics_port,
            "health_port": probes and probes[1],
            "pid": os.getpid(),
        },
    )
    if settings.ready_file:
        files.write_ready(Path(settings.ready_file), port, metrics_port, rt.tls is not None)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def warm_up() -> None:
        for hook in rt._warmups:
            await hook()
        frozen = gc_heap.freeze() if settings.gc_freeze else 0
        await rt.set_serving(True)
        log.info("serving", extra={"gc_frozen_objects": frozen})

    warming = asyncio.create_task(warm_up())
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({warming, stopping}, return_when=asyncio.FIRST_COMPLETED)
    failed = warming in done and warming.exception() is not None
    if failed:
        log.error("warm-up failed", exc_info=warming.exception())
    else:
        await stopping
    warming.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await warming

    # Drain: load balancers see NOT_SERVING first, then new calls are refused
    # while in-flight ones get grace_seconds to finish.
    log.info("draining", extra={"drain_seconds": settings.drain_seconds, "grace_seconds": settings.grace_seconds})
    rt.draining.set()
    await rt.health.enter_graceful_shutdown()
    if not failed:
        await asyncio.sleep(settings.drain_seconds)
    await asyncio.gather(rt.server.stop(settings.grace_seconds), *([probes[0].stop(0)] if probes else []))
    for hook in reversed(rt._shutdown_hooks):
        try:
            await asyncio.wait_for(hook(), timeout=10)
        except Exception:
            log.exception("shutdown hook failed")
    await tracing.shutdown()
    log.info("stopped")
    if failed:
        raise SystemExit(1)


def _health_server(rt: Runtime, settings: ServiceSettings) -> tuple[aio.Server, int]:
    """A plaintext server with the same health service and nothing else: what a probe that cannot present a
    mesh certificate (the kubelet's) reads. It answers health alone, so it exposes no RPC to unauthenticated
    callers."""
    server = aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(rt.health, server)
    return server, server.add_insecure_port(f"{settings.host}:{settings.health_port}")


def serve(
    name: str,
    settings: ServiceSettings,
    service_names: Sequence[str],
    setup: Callable[[Runtime], Awaitable[None]],
) -> None:
    """Runs a service until SIGTERM or SIGINT, then drains and stops it."""
    configure_logging(name, settings.log_level, settings.log_json)
    tracing.configure(name)
    with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
        runner.run(_run(name, settings, service_names, setup))


def _loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop a service runs on (None: asyncio's own)."""
    if kind == "uvloop":
        return uvloop.new_event_loop
    return None


def check_health(
    target: str, service: str = "", timeout: float = 2.0, files: tls.Files | None = None, peer: str = ""
) -> bool:
    """True when the server at target reports SERVING (a blocking probe for CLIs and tests).

    With files, over mutual TLS to the mesh service peer.
    """
    with tls.channel(target, files, peer) as channel_:
        try:
            stub: Any = health_pb2_grpc.HealthStub(channel_)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
