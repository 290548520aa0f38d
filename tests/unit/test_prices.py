"""The price table: exact decimal costs, validation that names the field."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from services.billing.prices import Prices
from services.runtime.errors import InvalidArgument


def test_costs_are_exact_decimals_even_when_yaml_wrote_floats(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(
        "models:\n  m:\n    prompt_per_1k: 0.1\n    completion_per_1k: '0.3'\n"
        "default:\n  prompt_per_1k: 1\n  completion_per_1k: 2\n"
    )
    prices = Prices.from_yaml(path)
    # 1,000 prompt tokens at 0.1 and 666 completion tokens at 0.3 per 1K are 0.2998, exactly.
    assert prices.cost("m", 1000, 666) == Decimal("0.299800")
    assert prices.cost("m", 1, 0) == Decimal("0.000100")
    assert prices.cost("other", 500, 500) == Decimal("1.500000")
    assert sum((prices.cost("m", 1000, 0) for _ in range(3)), Decimal(0)) == Decimal("0.3")


def test_a_model_without_a_price_and_no_default_costs_nothing() -> None:
    assert Prices().cost("m", 10**9, 10**9) == Decimal("0.000000")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("models:\n  m:\n    prompt_per_1k: -1\n    completion_per_1k: 1\n", "models.m.prompt_per_1k"),
        ("models:\n  m:\n    prompt_per_1k: 1\n", "models.m.completion_per_1k"),
        ("modles: {}\n", "modles"),
    ],
)
def test_a_bad_table_names_the_field(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=where):
        Prices.from_yaml(path)
