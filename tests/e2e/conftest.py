"""The end-to-end tests' oracle: vLLM's own OpenAI server on the model the mesh serves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.edge_vs_vllm import vllm_server
from services.inference.config import InferenceSettings


@pytest.fixture(scope="module")
def vllm_url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's own server (its OpenAI and Anthropic routes) with the replicas' settings: its base URL."""
    with vllm_server(model_dir, tmp_path_factory.mktemp("vllm"), InferenceSettings()) as url:
        yield url
