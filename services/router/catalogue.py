"""The model catalogue: which models the router serves, their versions with traffic weights, and replicas."""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.router.balancer import ReplicaState
from services.runtime.errors import InvalidArgument, NotFound, echo

log = logging.getLogger(__name__)

# What a version may say its replicas must run, as they report it (GetLoad): a replica that runs another
# scheme (a pod left from before a rollout to a quantized checkpoint) is kept out of the version's rotation.
SCHEME_FIELDS = ("quantization", "kv_cache_dtype")
# Who a model's cached answers are kept for (the router's response cache, cache.py): nobody (off), the tenant
# that asked (tenant), or every tenant (shared: one tenant's answer may be served to another).
CACHE_SCOPES = ("off", "tenant", "shared")


@dataclass(frozen=True)
class Version:
    """One version of a model: its share of traffic and where it runs."""

    name: str
    weight: float
    # host:port, or dns:///name:port for a Kubernetes headless Service.
    replicas: tuple[str, ...]
    # How much of a replica's capacity counts, by the pool it reports (spot, on-demand): a pool weighted 2
    # fills before one weighted 1. A pool without a weight counts 1.
    pool_weights: Mapping[str, float] = field(default_factory=dict, hash=False)
    # (field, value) of SCHEME_FIELDS its replicas must report; empty: any.
    scheme: tuple[tuple[str, str], ...] = ()

    def serving(self, states: Sequence[ReplicaState]) -> Sequence[ReplicaState]:
        """The states of replicas that run the scheme the version names (all, where it names none)."""
        if not self.scheme:
            return states
        return [s for s in states if s.report is None or self._runs(s)]

    def _runs(self, state: ReplicaState) -> bool:
        for name, expected in self.scheme:
            reported = getattr(state.report, name)
            if reported != expected:
                _mismatch(self.name, state.address, name, expected, reported)
                return False
        return True


@functools.lru_cache(maxsize=1024)
def _mismatch(version: str, address: str, name: str, expected: str, reported: str) -> None:
    """Logged once per replica and scheme (the check runs on every choice)."""
    log.warning(
        "replica kept out of rotation: it runs another scheme than its version names",
        extra={"version": version, "replica": address, "field": name, "expected": expected, "reported": reported},
    )


@dataclass(frozen=True)
class ModelEntry:
    """One servable model."""

    id: str
    versions: tuple[Version, ...]
    created: int
    owned_by: str
    # The router reports ready only once this model has a replica in rotation; False lets it be ready
    # without (a model whose replicas start later, or scale from zero).
    required_for_ready: bool = True
    # Whose deterministic requests the response cache answers again (CACHE_SCOPES).
    cache: str = "off"

    def pick(self, rng: random.Random) -> Version:
        """A version drawn by weight (a 90/10 canary sends about 10% of requests to the second)."""
        if len(self.versions) == 1:
            return self.versions[0]
        return rng.choices(self.versions, weights=[v.weight for v in self.versions])[0]

    def version(self, name: str) -> Version:
        """The version a client pinned, or NotFound naming the versions there are."""
        for v in self.versions:
            if v.name == name:
                return v
        known = ", ".join(v.name for v in self.versions)
        raise NotFound(f"model {self.id!r} has no version {echo(name)}; its versions: {known}")

    def targets(self) -> set[str]:
        """Every replica address or name of every version."""
        return {r for v in self.versions for r in v.replicas}


def _replicas(raw: Any, where: str) -> tuple[str, ...]:
    if not raw or not isinstance(raw, list) or not all(isinstance(r, str) and r for r in raw):
        raise InvalidArgument(f"{where}: needs at least one replica address (host:port or dns:///name:port)")
    return tuple(raw)


def _pool_weights(raw: Any, where: str) -> dict[str, float]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for k, v in raw.items()
    ):
        raise InvalidArgument(f"{where}.pool_weights: must map pool names to positive numbers")
    return {k: float(v) for k, v in raw.items()}


def _scheme(
    raw: dict[str, Any], where: str, inherited: tuple[tuple[str, str], ...] = ()
) -> tuple[tuple[str, str], ...]:
    named = dict(inherited)
    for name in SCHEME_FIELDS:
        if name in raw:
            if not isinstance(raw[name], str) or not raw[name]:
                raise InvalidArgument(f"{where}.{name}: must be a scheme as replicas report it, e.g. fp8")
            named[name] = raw[name]
    return tuple(sorted(named.items()))


def _versions(raw: dict[str, Any], where: str) -> tuple[Version, ...]:
    weights = _pool_weights(raw.get("pool_weights"), where)
    scheme = _scheme(raw, where)
    if "versions" not in raw:
        return (Version("default", 1.0, _replicas(raw.get("replicas"), where), weights, scheme),)
    versions = []
    for j, v in enumerate(raw["versions"] or []):
        at = f"{where}.versions[{j}]"
        if not isinstance(v, dict) or not v.get("name"):
            raise InvalidArgument(f"{at}: needs a name")
        weight = float(v.get("weight", 1))
        if weight < 0:
            raise InvalidArgument(f"{at}: weight must not be negative")
        replicas = _replicas(v.get("replicas"), at)
        versions.append(Version(str(v["name"]), weight, replicas, weights, _scheme(v, at, scheme)))
    if not versions or sum(v.weight for v in versions) <= 0:
        raise InvalidArgument(f"{where}: needs at least one version with a positive weight")
    return tuple(versions)


class Catalogue:
    """Models by id, in file order."""

    def __init__(self, entries: list[ModelEntry]) -> None:
        self._entries = {e.id: e for e in entries}

    @classmethod
    def from_yaml(cls, path: Path) -> Catalogue:
        """Reads `models: [{id, replicas: [...]} | {id, versions: [{name, weight, replicas}]}]`, each model with
        optional `pool_weights: {pool: weight}`, `quantization` and `kv_cache_dtype` on a model or a version
        (what its replicas must report running), and `cache: off | tenant | shared` (CACHE_SCOPES)."""
        data = yaml.safe_load(path.read_text()) or {}
        entries = []
        for i, raw in enumerate(data.get("models") or []):
            where = f"{path}: models[{i}]"
            if not isinstance(raw, dict) or not raw.get("id"):
                raise InvalidArgument(f"{where}: needs an id")
            cache = raw.get("cache", "off")
            cache = "off" if cache is False else cache  # YAML reads a bare `off` as false
            if cache not in CACHE_SCOPES:
                raise InvalidArgument(f"{where}.cache: must be one of {', '.join(CACHE_SCOPES)}, got {echo(cache)}")
            entries.append(
                ModelEntry(
                    id=str(raw["id"]),
                    versions=_versions(raw, where),
                    created=int(raw.get("created", 0)),
                    owned_by=str(raw.get("owned_by", "meshserve")),
                    required_for_ready=bool(raw.get("required_for_ready", True)),
                    cache=cache,
                )
            )
        return cls(entries)

    def get(self, model: str) -> ModelEntry:
        """The entry for model, or NotFound with the models that do exist."""
        try:
            return self._entries[model]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise NotFound(f"model {echo(model)} does not exist; available models: {known}") from None

    def entries(self) -> list[ModelEntry]:
        """Every model, in file order."""
        return list(self._entries.values())
