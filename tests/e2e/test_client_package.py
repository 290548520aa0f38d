"""The meshserve-client wheel (clients/python) built from this tree: installed alone into a fresh virtual
environment at exactly its dependency floors (grpcio, protobuf and googleapis-common-protos from the registry,
nothing of the server's), it streams a chat completion from the running mesh's edge; and it is Python 3.9's, which
no interpreter here runs: pip resolves it for 3.9 and vermin finds nothing in its code newer than 3.9."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from clients.python.build import build
from services.mesh.local import LocalMesh
from tests.conftest import MODEL

OLDEST = "3.9"

CLIENT = """
import importlib, importlib.util, json, pkgutil, sys
import meshserve
from meshserve_client import Edge

# Nothing of the server's came with it, and every stub imports at these versions.
assert [m for m in ("services", "vllm", "torch", "redis") if importlib.util.find_spec(m)] == []
for module in pkgutil.walk_packages(meshserve.__path__, "meshserve."):
    importlib.import_module(module.name)
target, key, model = sys.argv[1:]
body = {"model": model, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "temperature": 0}
with Edge(target, key) as edge:
    chunks = list(edge.stream_chat(body))
    whole = edge.chat(body)
print(json.dumps({"chunks": chunks, "whole": whole}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("dist"))


def _metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return archive.read(name).decode()


def _floors(wheel: Path) -> list[str]:
    """Each dependency pinned at its floor (its >= bound)."""
    floors = []
    for line in _metadata(wheel).splitlines():
        if line.startswith("Requires-Dist:"):
            found = re.search(r"^([A-Za-z0-9_.-]+).*?>=\s*([^,;\s]+)", line.removeprefix("Requires-Dist:").strip())
            assert found, f"no floor in {line!r}"
            floors.append(f"{found[1]}=={found[2]}")
    return floors


@pytest.mark.mesh
def test_the_client_wheel_alone_at_its_floors_streams_a_chat_completion_from_the_edge(
    mesh: LocalMesh, wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    floors = _floors(wheel)
    assert {f.split("==")[0] for f in floors} == {"grpcio", "protobuf", "googleapis-common-protos"}
    install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel), *floors]
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


def test_the_client_wheel_is_for_python_3_9(wheel: Path, tmp_path: Path) -> None:
    assert f"Requires-Python: >={OLDEST}" in _metadata(wheel).splitlines()
    # pip finds a release of every dependency that installs on 3.9 and satisfies the wheel.
    report = tmp_path / "report.json"
    resolve = [
        *(sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check"),
        *("--ignore-installed", "--only-binary=:all:", "--python-version", OLDEST, "--implementation", "cp"),
        *("--platform", "manylinux2014_x86_64", "--target", str(tmp_path / "target"), "--report", str(report)),
        str(wheel),
    ]
    subprocess.run(resolve, check=True, timeout=600)
    chosen = {i["metadata"]["name"] for i in json.loads(report.read_text())["install"]}
    assert {"meshserve-client", "grpcio", "protobuf", "googleapis-common-protos"} <= chosen
    # Its code, the generated stubs' included, uses nothing newer than 3.9 (the type stubs choose by version).
    unpacked = tmp_path / "wheel"
    zipfile.ZipFile(wheel).extractall(unpacked)
    vermin = Path(sys.executable).parent / "vermin"
    checked = subprocess.run(
        [str(vermin), f"-t={OLDEST}-", "--no-tips", "--violations", "--exclude-regex", r"\.pyi$", str(unpacked)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "meshserve_client/__init__.py" in {str(p.relative_to(unpacked)) for p in unpacked.rglob("*.py")}
