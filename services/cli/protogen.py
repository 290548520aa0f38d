"""Generates the Python stubs in gen/ from protos/ (grpcio-tools' protoc and mypy-protobuf)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"


def _include_dirs() -> list[str]:
    import grpc_tools

    return [str(PROTOS), str(ROOT / "third_party" / "googleapis"), str(Path(grpc_tools.__file__).parent / "_proto")]


def generate(out: Path) -> None:
    """Writes *_pb2.py, *_pb2.pyi, *_pb2_grpc.py and *_pb2_grpc.pyi for every proto under protos/ into out."""
    from grpc_tools import protoc

    plugin = shutil.which("protoc-gen-mypy_grpc", path=str(Path(sys.executable).parent))
    if plugin is None:
        raise SystemExit("protoc-gen-mypy_grpc not found: install mypy-protobuf")
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        *(f"-I{d}" for d in _include_dirs()),
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy_grpc={plugin}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Regular packages, so `meshserve.llm.v1` imports like any library.
    for folder in [out / "meshserve", *(p for p in (out / "meshserve").rglob("*") if p.is_dir())]:
        init = folder / "__init__.py"
        if not init.exists():
            init.write_text("")
    (out / "meshserve" / "py.typed").write_text("")


def stale_files() -> list[str]:
    """Files of gen/ that differ from a fresh generation (empty when gen/ is current)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        names = {str(p.relative_to(fresh)) for p in fresh.rglob("*") if p.is_file()}
        names |= {str(p.relative_to(GEN)) for p in GEN.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
        return sorted(
            n
            for n in names
            if not (GEN / n).is_file()
            or not (fresh / n).is_file()
            or (GEN / n).read_bytes() != (fresh / n).read_bytes()
        )


def main() -> None:
    if GEN.exists():
        shutil.rmtree(GEN)
    generate(GEN)
    print(f"generated stubs in {GEN}")


if __name__ == "__main__":
    main()


def buf(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs the buf CLI (from buf-bin) in the repo root."""
    exe = shutil.which("buf", path=str(Path(sys.executable).parent))
    if exe is None:
        raise SystemExit("buf not found: install buf-bin")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, check=False)
