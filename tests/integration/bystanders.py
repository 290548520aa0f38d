"""Streams of another tenant that run while a test misbehaves: each must finish whole, or the test fails."""

from __future__ import annotations

import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from services.mesh.local import LocalMesh
from tests.e2e.helpers import create_key

MODEL = "smollm2-135m-instruct"


class Bystanders:
    """Streams of another tenant that run while a test misbehaves; each must finish whole."""

    def __init__(self, mesh: LocalMesh, streams: int = 8) -> None:
        _, self.key = create_key(mesh, f"bystander-{time.monotonic_ns()}")
        self.mesh = mesh
        # A TLS edge: trust the mesh's CA (each stream is a new connection, so a new handshake).
        self._verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(mesh.edge_ca)) if mesh.edge_ca else True
        )
        self.results: list[str] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(streams)
        self._futures = [self._pool.submit(self._run) for _ in range(streams)]

    def _run(self) -> None:
        while not self._stop.is_set():
            with httpx.stream(
                "POST",
                f"{self.mesh.edge_url}/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True},
                headers={"authorization": f"Bearer {self.key}"},
                timeout=30,
                verify=self._verify,
            ) as r:
                body = r.read().decode()
            whole = r.status_code == 200 and '"finish_reason":"stop"' in body and body.rstrip().endswith("data: [DONE]")
            self.results.append("ok" if whole else f"{r.status_code}: {body[-200:]}")

    def __enter__(self) -> Bystanders:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for f in self._futures:
            f.result(timeout=60)
        self._pool.shutdown()
        failed = [r for r in self.results if r != "ok"]
        assert self.results and not failed, f"bystander streams hurt: {failed[:3]}"
