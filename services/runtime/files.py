"""Small file helpers shared by services and tools."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Writes data to a file beside path, then renames it over path: a reader (or a watch on moves,
    as Envoy's) sees the old file or the new one, whole."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def write_private(path: Path, data: dict[str, str] | bytes) -> None:
    """Writes JSON (or bytes as they are) atomically, readable only by its owner (credentials, keys)."""
    write_atomic(path, data if isinstance(data, bytes) else json.dumps(data).encode(), 0o600)


def write_ready(path: Path, grpc_port: int, metrics_port: int, mtls: bool) -> None:
    """Announces a bound service: its ports and whether it takes mutual TLS only, as JSON, written
    atomically (the mesh polls for the file; `meshserve usage` and `top` read it)."""
    write_atomic(path, json.dumps({"grpc_port": grpc_port, "metrics_port": metrics_port, "mtls": mtls}).encode())
