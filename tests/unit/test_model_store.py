"""The model store: entries appear whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.inference import model_store
from services.inference.model_store import ModelStore
from services.runtime.errors import NotFound


def test_build_once_then_reuse(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    calls = []

    def writer(target: Path) -> None:
        calls.append(target)
        (target / "config.json").write_text("{}")

    path = store.build("m", writer)
    assert (path / "config.json").is_file()
    assert store.build("m", writer) == path
    assert len(calls) == 1
    assert store.names() == ["m"]


def test_a_failed_build_leaves_nothing_that_looks_usable(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)

    def broken(target: Path) -> None:
        (target / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store.build("m", broken)
    assert not store.has("m")
    assert store.names() == []
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NotFound):
        store.path("m")


def test_unknown_models_cannot_be_built(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="cannot build"):
        model_store.ensure(ModelStore(tmp_path), "gpt-9")


def test_the_packaged_gguf_is_found_without_importing_its_package() -> None:
    gguf = model_store.packaged_gguf()
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 50_000_000


def test_hub_ids_are_nested_entries(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.build("org/model", lambda target: (target / "config.json").write_text("{}"))  # type: ignore[func-returns-value]
    assert store.has("org/model") and store.names() == ["org/model"]
    assert (tmp_path / "org" / "model" / "config.json").is_file()
