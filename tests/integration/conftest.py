"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from services.mesh.local import LocalMesh, MeshOptions


@pytest.fixture(scope="module")
def redis_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """A mesh of one Redis (per test module), to start services on."""
    m = LocalMesh(MeshOptions(state_dir=tmp_path_factory.mktemp("redis-mesh"), model_store=Path("unused")))
    try:
        m.start_redis()
        yield m
    finally:
        m.stop()


@pytest.fixture
async def client(redis_mesh: LocalMesh) -> AsyncIterator[redis.Redis]:
    """A client of the module's Redis, emptied for each test."""
    c = redis.Redis.from_url(redis_mesh.redis_url, **redis_mesh.redis_options())
    await c.flushdb()
    yield c
    await c.aclose()
