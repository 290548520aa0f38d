"""The price table: per model, a price per 1,000 prompt and per 1,000 completion tokens, in exact decimals, and
one for the tokens of answers served from the router's response cache (none by default: a cached answer is free)."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.runtime.errors import InvalidArgument

# Costs are kept to a millionth of the currency unit, rounded half-even (banker's rounding).
QUANTUM = Decimal("0.000001")


class Price(BaseModel):
    """What 1,000 tokens of one model cost."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_per_1k: Decimal = Field(ge=0)
    completion_per_1k: Decimal = Field(ge=0)
    # The tokens a cached answer reports (no engine worked for them).
    cached_prompt_per_1k: Decimal = Field(default=Decimal(0), ge=0)
    cached_completion_per_1k: Decimal = Field(default=Decimal(0), ge=0)


class Prices(BaseModel):
    """Prices by model; a model without one costs the default (none: zero)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    currency: str = "USD"
    default: Price | None = None
    models: dict[str, Price] = Field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: Path) -> Prices:
        """Reads and validates the table; a bad entry is InvalidArgument naming the field."""
        try:
            # Prices as strings or numbers; YAML floats go through str() so 0.1 stays exactly 0.1.
            return cls.model_validate(_decimals(yaml.safe_load(path.read_text()) or {}))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InvalidArgument(f"{path}: {where}: {first['msg']}") from None

    def price_of(self, model: str) -> Price | None:
        """The model's price, or the default (None: it costs nothing)."""
        return self.models.get(model, self.default)

    def cost(
        self,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        rounding: str = ROUND_HALF_EVEN,
        cached_prompt_tokens: int = 0,
        cached_completion_tokens: int = 0,
    ) -> Decimal:
        """The exact cost of the tokens (generated, and those of cached answers at the cache's price), rounded
        to QUANTUM (spend budgets round up: a sum of costs rounded up is never below the ledger's cost of the
        summed tokens)."""
        price = self.price_of(model)
        if price is None:
            return Decimal(0).quantize(QUANTUM)
        raw = (
            prompt_tokens * price.prompt_per_1k
            + completion_tokens * price.completion_per_1k
            + cached_prompt_tokens * price.cached_prompt_per_1k
            + cached_completion_tokens * price.cached_completion_per_1k
        ) / 1000
        return raw.quantize(QUANTUM, rounding=rounding)


def _decimals(value: object) -> object:
    if isinstance(value, float):
        return str(value)
    if isinstance(value, dict):
        return {k: _decimals(v) for k, v in value.items()}
    return value
