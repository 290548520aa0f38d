"""Waiting for the local mesh's processes: bound, serving, in rotation; a dead one fails the wait at once."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from collections.abc import Callable

from deploy.envoy.settings import Address
from services.mesh.procs import MeshError, MeshOptions, Proc, wait_http_ok
from services.runtime import tls
from services.runtime.server import check_health


class Readiness:
    """The waits of LocalMesh (its base): what it starts is used only once these say so."""

    options: MeshOptions
    procs: dict[str, Proc]
    admin: Address

    def identity(self, name: str) -> tls.Files | None:
        raise NotImplementedError

    def wait_routable(self, router: Proc, replicas: list[Proc], timeout: float) -> None:
        """Waits until the router has every replica in rotation (its load stream reports)."""
        wanted = [
            f'meshserve_router_replica_available{{replica="{self.options.host}:{p.grpc_port}"}} 1.0' for p in replicas
        ]
        url = f"http://{self.options.host}:{router.metrics_port}/metrics"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(router)
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
                body = r.read().decode()
                if all(line in body for line in wanted):
                    return
            time.sleep(0.1)
        raise MeshError(f"router did not take every replica into rotation within {timeout:.0f}s\n{router.tail()}")

    def wait_bound(self, proc: Proc, timeout: float) -> None:
        """Waits until a service has bound its ports (it writes its ready file)."""
        assert proc.ready_file is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(proc)
            if proc.ready_file.exists():
                ports = json.loads(proc.ready_file.read_text())
                proc.grpc_port, proc.metrics_port = ports["grpc_port"], ports["metrics_port"]
                return
            time.sleep(0.1)
        raise MeshError(f"{proc.name} did not bind within {timeout:.0f}s\n{proc.tail()}")

    def wait_serving(self, proc: Proc, timeout: float, tick: Callable[[], None] | None = None) -> None:
        """Waits until a service's health says SERVING (for inference: model loaded and warmed up)."""
        self.wait_bound(proc, timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(proc)
            target = f"{self.options.host}:{proc.grpc_port}"
            if check_health(target, timeout=1.0, files=self.identity("admin"), peer=proc.kind):
                return
            if tick is not None:
                tick()
            time.sleep(0.25)
        raise MeshError(f"{proc.name} was not serving within {timeout:.0f}s\n{proc.tail()}")

    def wait_edge(self, timeout: float) -> None:
        """Waits until Envoy answers on its admin /ready."""
        proc = self.procs["envoy"]
        if not wait_http_ok(
            f"http://{self.admin.host}:{self.admin.port}/ready", lambda: self._check_alive(proc), timeout
        ):
            raise MeshError(f"envoy was not ready within {timeout:.0f}s\n{proc.tail()}")

    def _check_alive(self, proc: Proc) -> None:
        if not proc.alive():
            raise MeshError(f"{proc.name} exited with code {proc.popen.returncode}\n{proc.tail()}")
