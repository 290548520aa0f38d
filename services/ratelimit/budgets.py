"""Spend budgets: an amount of money per period (a UTC day, a UTC month, or no reset), for a key, a tenant, or
a tenant and one model. Amounts are exact decimals in the price table's currency, kept in Redis as whole
millionths (the price table's quantum), so a sum of costs and a budget compare exactly."""

from __future__ import annotations

import calendar
import enum
import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from pydantic import BaseModel, ConfigDict, Field

from services.billing.prices import QUANTUM
from services.runtime.errors import InvalidArgument, echo

# Millionths of the currency unit in one unit.
MICROS = 1_000_000
# How long a closed period's spend stays readable (usage reports of last month), beyond its end.
KEPT_SECONDS = 35 * 86400


class Period(enum.StrEnum):
    """When a budget starts again from nothing spent."""

    DAY = "day"
    MONTH = "month"
    NONE = "none"


def micros(amount: Decimal) -> int:
    """A money amount as whole millionths (rounded up: a hold never covers less than the cost)."""
    return int((amount / QUANTUM).to_integral_value(rounding="ROUND_CEILING"))


def money(amount_micros: int) -> Decimal:
    return (Decimal(amount_micros) * QUANTUM).quantize(QUANTUM)


@dataclass(frozen=True)
class Budget:
    """At most `amount` spent per `period`."""

    amount: Decimal
    period: Period

    @classmethod
    @functools.lru_cache(maxsize=4096)  # every request of a budgeted key carries the same text
    def parse(cls, text: str) -> Budget:
        """A budget written as "<amount>/<period>" (the identity header's form, `keys create --budget`)."""
        amount, _, period = text.partition("/")
        try:
            value = Decimal(amount)
        except InvalidOperation:
            raise InvalidArgument(f"budget: {echo(text)} is not <amount>/<period>") from None
        if not value.is_finite() or value < 0:
            raise InvalidArgument(f"budget: the amount must be a non-negative number, got {echo(amount)}")
        try:
            return cls(value.quantize(QUANTUM), Period(period or Period.NONE))
        except ValueError:
            periods = ", ".join(p.value for p in Period)
            raise InvalidArgument(f"budget: the period must be one of {periods}, got {echo(period)}") from None

    def __str__(self) -> str:
        return f"{self.amount.normalize():f}/{self.period.value}"

    @property
    def limit_micros(self) -> int:
        return micros(self.amount)

    def window(self, now: float) -> tuple[str, float]:
        """The current period's name (part of its Redis key) and the seconds its spend is kept from now."""
        if self.period is Period.NONE:
            return "all", 0.0
        at = datetime.fromtimestamp(now, UTC)
        if self.period is Period.DAY:
            start = datetime(at.year, at.month, at.day, tzinfo=UTC)
            end = start.timestamp() + 86400
            return start.strftime("d%Y%m%d"), end - now + KEPT_SECONDS
        days = calendar.monthrange(at.year, at.month)[1]
        start = datetime(at.year, at.month, 1, tzinfo=UTC)
        return start.strftime("m%Y%m"), start.timestamp() + days * 86400 - now + KEPT_SECONDS


class _Amount(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    amount: Decimal = Field(ge=0)
    period: Period = Period.MONTH

    def budget(self) -> Budget:
        return Budget(self.amount.quantize(QUANTUM), self.period)


class TenantBudgets(BaseModel):
    """A tenant's budget over all its keys and models, and its budgets per model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    amount: Decimal | None = Field(default=None, ge=0)
    period: Period = Period.MONTH
    models: dict[str, _Amount] = Field(default_factory=dict)

    def budget(self) -> Budget:
        assert self.amount is not None
        return Budget(self.amount.quantize(QUANTUM), self.period)

    def model_budgets(self) -> dict[str, Budget]:
        return {model: amount.budget() for model, amount in self.models.items()}
