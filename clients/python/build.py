"""Builds the meshserve-client wheel: the stubs generated from protos/ for the oldest Python it supports, staged
with this folder, then pip.

gen/ is generated for the server, by its own grpcio-tools; the generated code checks that the runtime is at least
that version, whose grpcio and protobuf no longer run on Python 3.9. The client's stubs are generated instead by
GRPCIO_TOOLS, the newest grpcio-tools that still supports 3.9, in a virtual environment of their own, by the same
generator as gen/ (services/cli/protogen.py, run by its path: it imports only the standard library and grpc_tools).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOGEN = HERE.parents[1] / "services" / "cli" / "protogen.py"
# The newest grpcio-tools that supports Python 3.9; its code needs grpcio >= 1.80.1 and protobuf >= 6.31.1
# (pyproject.toml's floors; a test installs the wheel at exactly those).
GRPCIO_TOOLS = "grpcio-tools==1.80.1"
MYPY_PROTOBUF = "mypy-protobuf==5.1.0"
GENERATE = """
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("protogen", sys.argv[1])
protogen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(protogen)
protogen.generate(Path(sys.argv[2]))
"""


def generate(out: Path, work: Path) -> None:
    """The stubs of every proto under protos/, by GRPCIO_TOOLS, into out."""
    env = work / "generator"
    venv.create(env, with_pip=True)
    python = str(env / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, GRPCIO_TOOLS, MYPY_PROTOBUF], check=True, timeout=600)
    subprocess.run([python, "-c", GENERATE, str(PROTOGEN), str(out)], check=True, capture_output=True, timeout=300)


def build(dist: Path) -> Path:
    """The wheel, written into dist."""
    dist.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "meshserve-client"
        shutil.copytree(HERE, stage, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "meshserve"))
        stubs = Path(tmp) / "stubs"
        generate(stubs, Path(tmp))
        shutil.copytree(stubs / "meshserve", stage / "meshserve")
        out = Path(tmp) / "dist"
        pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"]
        subprocess.run([*pip, "-w", str(out), "."], cwd=stage, check=True)
        [built] = out.glob("meshserve_client-*.whl")
        return Path(shutil.move(built, dist / built.name))


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "dist"))
