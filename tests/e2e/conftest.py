"""The end-to-end tests' oracle: vLLM's own OpenAI server on the model the mesh serves."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.edge_vs_vllm import start_vllm_server, wait_http
from services.inference.config import InferenceSettings
from services.mesh.procs import free_port


@pytest.fixture(scope="module")
def vllm_url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's own server (its OpenAI and Anthropic routes) with the replicas' settings: its base URL."""
    port = free_port()
    proc = start_vllm_server(model_dir, port, tmp_path_factory.mktemp("vllm"), InferenceSettings())
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, 300)
        yield f"http://127.0.0.1:{port}"
    finally:
        # vLLM's engine core runs in the server's process group: stop them all.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
