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
# How a model uses an external provider (providers.py): it is the model's only backend (only), it answers
# while no local replica is in rotation or all failed (fallback), or it takes the requests of the tenants
# allowed to overflow while the local queue's expected wait passes the model's threshold (overflow).
PROVIDER_USES = ("only", "fallback", "overflow")


@dataclass(frozen=True)
class ProviderConfig:
    """An external OpenAI-compatible endpoint. Its API key comes from an environment variable or a file (a
    mounted Kubernetes Secret), never from the catalogue itself."""

    name: str
    base_url: str
    api_key_env: str = ""
    api_key_file: str = ""
    timeout_seconds: float = 60.0
    # Requests of one model the router sends it at once (the capacity of the model's provider lane).
    max_concurrency: int = 64
    # The most tokens a request that names no maximum may generate (its tokens are reserved up front).
    max_tokens: int = 1024


@dataclass(frozen=True)
class ProviderRoute:
    """One of a model's backends at a provider: the provider's name, its name for the model, and the use."""

    provider: str
    model: str
    use: str


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
    # Its backends at external providers, in the order they are tried.
    providers: tuple[ProviderRoute, ...] = ()
    # The tenants whose requests may overflow to a provider (it costs money), and the local queue's
    # expected wait in seconds past which they do.
    overflow_tenants: frozenset[str] = frozenset()
    overflow_wait_seconds: float = 2.0

    def routes(self, use: str) -> tuple[ProviderRoute, ...]:
        """Its provider backends of one use."""
        return tuple(r for r in self.providers if r.use == use)

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
    if "versions" not in raw and "replicas" not in raw and raw.get("providers"):
        return (Version("default", 1.0, ()),)  # served by providers only
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


def _number(
    raw: dict[str, Any], name: str, where: str, default: float, integer: bool = False, zero: bool = False
) -> Any:
    """A positive number (or zero, where zero is allowed) of a provider's or an overflow's settings."""
    value = raw.get(name, default)
    wrong = isinstance(value, bool) or not isinstance(value, int | float) or value < 0
    if wrong or (value == 0 and not zero) or (integer and value != int(value)):
        kind = ("a whole number" if integer else "a number") + (" at least 0" if zero else " above 0")
        raise InvalidArgument(f"{where}.{name}: must be {kind}, got {echo(value)}")
    return int(value) if integer else float(value)


def _provider(raw: Any, where: str) -> ProviderConfig:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
        raise InvalidArgument(f"{where}: needs a name")
    base_url = raw.get("base_url")
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise InvalidArgument(f"{where}.base_url: must be an http(s) URL, got {echo(base_url)}")
    if "api_key" in raw:
        raise InvalidArgument(f"{where}.api_key: a key never goes in the catalogue: name api_key_env or api_key_file")
    env, file = raw.get("api_key_env", ""), raw.get("api_key_file", "")
    if not isinstance(env, str) or not isinstance(file, str) or bool(env) == bool(file):
        raise InvalidArgument(f"{where}: needs one of api_key_env (a variable's name) or api_key_file (a path)")
    return ProviderConfig(
        raw["name"],
        base_url.rstrip("/"),
        env,
        file,
        _number(raw, "timeout_seconds", where, 60.0),
        _number(raw, "max_concurrency", where, 64, integer=True),
        _number(raw, "max_tokens", where, 1024, integer=True),
    )


def _routes(raw: dict[str, Any], where: str, providers: Mapping[str, ProviderConfig]) -> tuple[ProviderRoute, ...]:
    local = "replicas" in raw or "versions" in raw
    routes = []
    for j, r in enumerate(raw.get("providers") or []):
        at = f"{where}.providers[{j}]"
        if not isinstance(r, dict) or r.get("provider") not in providers:
            known = ", ".join(sorted(providers)) or "none"
            raise InvalidArgument(f"{at}.provider: must name a provider of the catalogue's providers ({known})")
        if not isinstance(r.get("model"), str) or not r["model"]:
            raise InvalidArgument(f"{at}.model: the provider's name for the model is required")
        use = r.get("use", "fallback" if local else "only")
        if use not in PROVIDER_USES or (use == "only") == local:
            uses = "fallback or overflow" if local else "only (the model has no replicas)"
            raise InvalidArgument(f"{at}.use: must be {uses}, got {echo(use)}")
        routes.append(ProviderRoute(r["provider"], r["model"], use))
    return tuple(routes)


def _overflow(raw: dict[str, Any], where: str) -> tuple[frozenset[str], float]:
    overflow = raw.get("overflow") or {}
    tenants = overflow.get("tenants", []) if isinstance(overflow, dict) else None
    if not isinstance(tenants, list) or not all(isinstance(t, str) and t for t in tenants):
        raise InvalidArgument(f"{where}.overflow: must be {{tenants: [tenant, ...], wait_seconds: N}}")
    return frozenset(tenants), _number(overflow, "wait_seconds", f"{where}.overflow", 2.0, zero=True)


class Catalogue:
    """Models by id, in file order, and the external providers they may use."""

    def __init__(self, entries: list[ModelEntry], providers: Mapping[str, ProviderConfig] | None = None) -> None:
        self._entries = {e.id: e for e in entries}
        self.providers: Mapping[str, ProviderConfig] = providers or {}

    @classmethod
    def from_yaml(cls, path: Path) -> Catalogue:
        """Reads `models: [{id, replicas: [...]} | {id, versions: [{name, weight, replicas}]}]`, each model with
        optional `pool_weights: {pool: weight}`, `quantization` and `kv_cache_dtype` on a model or a version
        (what its replicas must report running), `cache: off | tenant | shared` (CACHE_SCOPES), and
        `providers: [{provider, model, use}]` with `overflow: {tenants, wait_seconds}` over the file's
        `providers: [{name, base_url, api_key_env | api_key_file, ...}]` (ProviderConfig)."""
        data = yaml.safe_load(path.read_text()) or {}
        providers: dict[str, ProviderConfig] = {}
        for i, raw in enumerate(data.get("providers") or []):
            provider = _provider(raw, f"{path}: providers[{i}]")
            providers[provider.name] = provider
        entries = []
        for i, raw in enumerate(data.get("models") or []):
            where = f"{path}: models[{i}]"
            if not isinstance(raw, dict) or not raw.get("id"):
                raise InvalidArgument(f"{where}: needs an id")
            cache = raw.get("cache", "off")
            cache = "off" if cache is False else cache  # YAML reads a bare `off` as false
            if cache not in CACHE_SCOPES:
                raise InvalidArgument(f"{where}.cache: must be one of {', '.join(CACHE_SCOPES)}, got {echo(cache)}")
            tenants, wait = _overflow(raw, where)
            entries.append(
                ModelEntry(
                    id=str(raw["id"]),
                    versions=_versions(raw, where),
                    created=int(raw.get("created", 0)),
                    owned_by=str(raw.get("owned_by", "meshserve")),
                    required_for_ready=bool(raw.get("required_for_ready", True)),
                    cache=cache,
                    providers=_routes(raw, where, providers),
                    overflow_tenants=tenants,
                    overflow_wait_seconds=wait,
                )
            )
        return cls(entries, providers)

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
