"""Rate-limit rules: plans of limits per scope, tenants on plans, failure modes. Read from YAML; no I/O beyond that."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.ratelimit.budgets import Budget, TenantBudgets
from services.runtime.errors import InvalidArgument

# Window lengths a limit may name.
UNITS = {"per_second": 1, "per_minute": 60, "per_hour": 3600}


class Kind(enum.StrEnum):
    """The kinds of limit, each with its own failure mode."""

    REQUESTS = "requests"
    TOKENS = "tokens"
    SPEND = "spend"


class Scope(enum.StrEnum):
    """Who a limit counts for."""

    KEY = "key"
    TENANT = "tenant"
    TENANT_MODEL = "tenant_model"


class FailureMode(enum.StrEnum):
    """What a decision is while Redis cannot be reached: let traffic through (open) or refuse it (closed)."""

    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class Limit:
    """At most `limit` units in any window of `seconds`, counted under `redis_key`."""

    scope: Scope
    limit: int
    seconds: int
    redis_key: str


class _Windows(BaseModel):
    model_config = ConfigDict(extra="forbid")

    per_second: int | None = Field(default=None, ge=1)
    per_minute: int | None = Field(default=None, ge=1)
    per_hour: int | None = Field(default=None, ge=1)

    def windows(self) -> dict[int, int]:
        """{window seconds: limit}."""
        return {UNITS[name]: value for name, value in self.model_dump().items() if value is not None}


class _RequestLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: _Windows = _Windows()
    tenant: _Windows = _Windows()
    tenant_model: _Windows = _Windows()


class _TokenLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: _Windows = _Windows()
    tenant: _Windows = _Windows()


class _Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: _RequestLimits = _RequestLimits()
    tokens: _TokenLimits = _TokenLimits()


class _FailureModes(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: FailureMode = FailureMode.OPEN
    tokens: FailureMode = FailureMode.OPEN


class _Budgets(BaseModel):
    """Spend budgets of tenants (keys carry their own), and what admission does while Redis is away."""

    model_config = ConfigDict(extra="forbid")

    failure_mode: FailureMode = FailureMode.CLOSED
    tenants: dict[str, TenantBudgets] = {}


class _Rules(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_plan: str
    plans: dict[str, _Plan]
    tenants: dict[str, str] = {}
    failure_mode: _FailureModes = _FailureModes()
    budgets: _Budgets = _Budgets()

    @model_validator(mode="after")
    def _plans_exist(self) -> _Rules:
        for tenant, plan in {"default_plan": self.default_plan, **self.tenants}.items():
            if plan not in self.plans:
                raise ValueError(f"{tenant}: unknown plan {plan!r} (plans: {', '.join(sorted(self.plans))})")
        return self


def _tag(tenant: str) -> str:
    # Every key of a tenant shares one Redis Cluster hash slot, so one script can touch them all.
    return "{" + tenant.replace("{", "_").replace("}", "_") + "}"


class Rules:
    """The limits that apply to a request, resolved from plan, tenant and per-key overrides."""

    def __init__(self, raw: _Rules) -> None:
        self._raw = raw
        # {plan: {(kind, scope): {window seconds: limit}}}, resolved once: decisions are a hot path.
        self._windows = {
            name: {
                (kind, scope): getattr(getattr(plan, kind.value), scope.value).windows()
                for kind, scopes in ((Kind.REQUESTS, tuple(Scope)), (Kind.TOKENS, (Scope.KEY, Scope.TENANT)))
                for scope in scopes
            }
            for name, plan in raw.plans.items()
        }

    @classmethod
    def parse(cls, data: Any, source: str = "rules") -> Rules:
        try:
            return cls(_Rules.model_validate(data))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors())
            raise InvalidArgument(f"{source}: {problems}") from None

    @classmethod
    def from_yaml(cls, path: Path) -> Rules:
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise InvalidArgument(f"{path}: not YAML: {exc}") from None
        return cls.parse(data, str(path))

    def failure_mode(self, kind: Kind) -> FailureMode:
        if kind is Kind.SPEND:
            return self._raw.budgets.failure_mode
        mode: FailureMode = getattr(self._raw.failure_mode, kind.value)
        return mode

    def plan_of(self, tenant: str) -> str:
        return self._raw.tenants.get(tenant, self._raw.default_plan)

    def _plan_windows(self, tenant: str, kind: Kind, scope: Scope) -> dict[int, int]:
        return dict(self._windows[self.plan_of(tenant)][(kind, scope)])

    def requests(self, scope: Scope, tenant: str, key_id: str = "", model: str = "", key_rpm: int = 0) -> list[Limit]:
        """Request limits of one Envoy descriptor; a key's own requests-per-minute replaces its plan's."""
        windows = self._plan_windows(tenant, Kind.REQUESTS, scope)
        if scope is Scope.KEY and key_rpm:
            windows[60] = key_rpm
        subject = {Scope.KEY: key_id, Scope.TENANT: "", Scope.TENANT_MODEL: model}[scope]
        return [
            Limit(scope, limit, seconds, f"mrl:{_tag(tenant)}:req:{scope.value}:{seconds}:{subject}")
            for seconds, limit in sorted(windows.items())
        ]

    def tokens(self, tenant: str, key_id: str, key_tpm: int = 0) -> list[Limit]:
        """Token limits of a key and its tenant; a key's own tokens-per-minute replaces its plan's."""
        key_windows = self._plan_windows(tenant, Kind.TOKENS, Scope.KEY)
        if key_tpm:
            key_windows[60] = key_tpm
        limits = [
            Limit(Scope.KEY, limit, seconds, f"mrl:{_tag(tenant)}:tok:key:{seconds}:{key_id}")
            for seconds, limit in sorted(key_windows.items())
        ]
        limits += [
            Limit(Scope.TENANT, limit, seconds, f"mrl:{_tag(tenant)}:tok:tenant:{seconds}:")
            for seconds, limit in sorted(self._plan_windows(tenant, Kind.TOKENS, Scope.TENANT).items())
        ]
        return limits

    def budgets(self, tenant: str, model: str, key_id: str, key_budget: Budget | None) -> list[tuple[str, str, Budget]]:
        """The spend budgets a request of this key and model draws on: (scope, Redis key prefix, budget)."""
        found = []
        if key_budget is not None:
            found.append(("key", f"msp:{_tag(tenant)}:key:{key_id}", key_budget))
        tenant_budget = self._raw.budgets.tenants.get(tenant)
        if tenant_budget is not None:
            if tenant_budget.amount is not None:
                found.append(("tenant", f"msp:{_tag(tenant)}:tenant:", tenant_budget.budget()))
            if (model_budget := tenant_budget.models.get(model)) is not None:
                found.append(("model", f"msp:{_tag(tenant)}:model:{model}", model_budget.budget()))
        return found

    @staticmethod
    def budget_index_key(tenant: str) -> str:
        """Where the names of a tenant's budgets that have been drawn on are kept (for usage reports)."""
        return f"msp:{_tag(tenant)}:budgets"

    def spend_key(self, tenant: str, request_id: str) -> str:
        """Where a request's spend hold is kept (the budgets it holds in, how much, for which prompt)."""
        return f"msp:{_tag(tenant)}:hold:{request_id}"

    def estimate_key(self, tenant: str, key_id: str, model: str) -> str:
        """Where the recent completion lengths of a key and model are kept."""
        return f"mrl:{_tag(tenant)}:est:{key_id}:{model}"

    def reservation_key(self, tenant: str, request_id: str) -> str:
        return f"mrl:{_tag(tenant)}:res:{request_id}"
