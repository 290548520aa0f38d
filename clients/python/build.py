"""Builds the meshserve-client wheel: stages this folder with the stubs from gen/ (their one copy) and runs pip."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GEN = HERE.parents[1] / "gen" / "meshserve"


def build(dist: Path) -> Path:
    """The wheel, written into dist."""
    dist.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "meshserve-client"
        shutil.copytree(HERE, stage, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "meshserve"))
        shutil.copytree(GEN, stage / "meshserve", ignore=shutil.ignore_patterns("__pycache__"))
        out = Path(tmp) / "dist"
        pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"]
        subprocess.run([*pip, "-w", str(out), "."], cwd=stage, check=True)
        [built] = out.glob("meshserve_client-*.whl")
        return Path(shutil.move(built, dist / built.name))


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "dist"))
