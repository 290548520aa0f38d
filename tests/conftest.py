"""Fixtures shared by every test: paths, free ports and the real local mesh."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.inference import model_store
from services.mesh.local import LocalMesh, MeshOptions
from tests.otlp_receiver import Receiver
from tests.postgres import running_postgres

ROOT = Path(__file__).resolve().parents[1]
MODEL = model_store.SMOLLM2
EMBEDDING_MODEL = model_store.MINILM
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The packaged model in the repo's model store, built once."""
    return model_store.ensure(model_store.ModelStore(ROOT / "var" / "models"), MODEL)


@pytest.fixture(scope="session")
def otlp() -> Iterator[Receiver]:
    """A local OTLP trace collector for the session mesh."""
    receiver = Receiver()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture(scope="session")
def mesh(model_dir: Path, otlp: Receiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """The whole local mesh (real vLLM, router, Envoy) on free ports, shared by the session.

    Every request is traced to the session's OTLP receiver: the end-to-end tests run with tracing on
    (the integration tests' meshes run with it off)."""
    state = tmp_path_factory.mktemp("mesh")
    rules = ROOT / "tests" / "e2e" / "ratelimits.yaml"
    model_store.ensure(model_store.ModelStore(model_dir.parent), EMBEDDING_MODEL)
    options = MeshOptions(
        state_dir=state,
        model=MODEL,
        model_store=model_dir.parent,
        embedding_model=EMBEDDING_MODEL,
        ratelimit_rules=rules,
        otlp_endpoint=otlp.endpoint,
        trace_sample_ratio=1.0,
        # Spans leave every 200 ms instead of every 5 s, so a test sees them soon.
        env={"OTEL_BSP_SCHEDULE_DELAY": "200"},
    )
    m = LocalMesh(options)
    try:
        m.start(timeout=600)
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A PostgreSQL server (Debian's package) for the session; the admin DSN. Tests make their own databases."""
    with running_postgres() as dsn:
        yield dsn
