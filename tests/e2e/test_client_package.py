"""The meshserve-client wheel (clients/python) built from this tree, installed alone into a fresh virtual
environment (grpcio, protobuf and googleapis-common-protos from the registry, nothing of the server's), streams a
chat completion from the running mesh's edge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clients.python.build import build
from services.mesh.local import LocalMesh
from tests.conftest import MODEL

pytestmark = pytest.mark.mesh

CLIENT = """
import importlib.util, json, sys
from meshserve_client import Edge

# Nothing of the server's came with it.
assert [m for m in ("services", "vllm", "torch", "redis") if importlib.util.find_spec(m)] == []
target, key, model = sys.argv[1:]
body = {"model": model, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "temperature": 0}
with Edge(target, key) as edge:
    chunks = list(edge.stream_chat(body))
    whole = edge.chat(body)
print(json.dumps({"chunks": chunks, "whole": whole}))
"""


def test_the_client_wheel_alone_streams_a_chat_completion_from_the_edge(mesh: LocalMesh, tmp_path: Path) -> None:
    wheel = build(tmp_path / "dist")
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)]
    subprocess.run(install, check=True, timeout=600)
    target = mesh.edge_url.removeprefix("http://")
    done = subprocess.run(
        [str(python), "-c", CLIENT, target, mesh.user_key, MODEL],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # not the tree: only what the wheel installed is importable
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in result["chunks"] if c["choices"])
    assert streamed and streamed == result["whole"]["choices"][0]["message"]["content"]
    assert result["chunks"][0]["id"] == result["chunks"][-1]["id"]
