"""The model catalogue: which models the router serves and where their replicas are (a YAML file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from services.runtime.errors import InvalidArgument, NotFound


@dataclass(frozen=True)
class ModelEntry:
    """One servable model."""

    id: str
    replicas: tuple[str, ...]
    created: int
    owned_by: str


class Catalogue:
    """Models by id, in file order."""

    def __init__(self, entries: list[ModelEntry]) -> None:
        self._entries = {e.id: e for e in entries}

    @classmethod
    def from_yaml(cls, path: Path) -> Catalogue:
        """Reads a catalogue file: `models: [{id, replicas: [host:port], created, owned_by}]`."""
        data = yaml.safe_load(path.read_text()) or {}
        entries = []
        for i, raw in enumerate(data.get("models") or []):
            where = f"{path}: models[{i}]"
            if not isinstance(raw, dict) or not raw.get("id"):
                raise InvalidArgument(f"{where}: needs an id")
            replicas = raw.get("replicas") or []
            if not replicas or not all(isinstance(r, str) and r for r in replicas):
                raise InvalidArgument(f"{where}: needs at least one replica address (host:port)")
            entries.append(
                ModelEntry(
                    id=str(raw["id"]),
                    replicas=tuple(replicas),
                    created=int(raw.get("created", 0)),
                    owned_by=str(raw.get("owned_by", "meshserve")),
                )
            )
        return cls(entries)

    def get(self, model: str) -> ModelEntry:
        """The entry for model, or NotFound with the models that do exist."""
        try:
            return self._entries[model]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise NotFound(f"model {model!r} does not exist; available models: {known}") from None

    def entries(self) -> list[ModelEntry]:
        """Every model, in file order."""
        return list(self._entries.values())
