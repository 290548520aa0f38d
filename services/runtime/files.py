"""Small file helpers shared by services and tools."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_private(path: Path, data: dict[str, str]) -> None:
    """Writes JSON atomically, readable only by its owner (credentials)."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    tmp.replace(path)


def write_ready(path: Path, grpc_port: int, metrics_port: int) -> None:
    """Announces a bound service: its ports as JSON, written atomically (the mesh polls for the file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"grpc_port": grpc_port, "metrics_port": metrics_port}))
    tmp.replace(path)
