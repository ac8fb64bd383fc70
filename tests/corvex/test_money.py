"""Money: nano-USD integers and their exact decimal text, both ways, and the refusal of any
text the unit cannot hold exactly."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corvex import money
from corvex.money import NANO_PER_CENT, NANO_PER_USD, MoneyError


@pytest.mark.parametrize(
    ("nano", "text"),
    [
        (0, "0.00"),
        (52_500, "0.0000525"),
        (25 * NANO_PER_USD, "25.00"),
        (NANO_PER_USD + 1, "1.000000001"),
        (10 * NANO_PER_CENT, "0.10"),
        (-20_650, "-0.00002065"),
    ],
)
def test_format_usd_is_exact_without_trailing_zeros(nano: int, text: str) -> None:
    assert money.format_usd(nano) == text


def test_format_usd_min_places() -> None:
    assert money.format_usd(5 * NANO_PER_USD, min_places=0) == "5"
    assert money.format_usd(5 * NANO_PER_USD, min_places=4) == "5.0000"


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_format_usd_round_trips_through_decimal(nano: int) -> None:
    assert Decimal(money.format_usd(nano)) * NANO_PER_USD == nano


@pytest.mark.parametrize(("text", "cents"), [("25.00", 2500), ("$1.5", 150), (" 0 ", 0)])
def test_cents_from_usd(text: str, cents: int) -> None:
    assert money.cents_from_usd(text) == cents


@pytest.mark.parametrize("text", ["0.001", "-1.00", "abc", "NaN", "Infinity", ""])
def test_cents_from_usd_refuses_what_is_not_whole_non_negative_cents(text: str) -> None:
    with pytest.raises(MoneyError):
        money.cents_from_usd(text)


@pytest.mark.parametrize(
    ("text", "nano"), [("0.35", 350), ("1.40", 1400), ("0.001", 1), ("0", 0), ("12", 12_000)]
)
def test_price_per_million_to_nano_per_token(text: str, nano: int) -> None:
    assert money.per_million_to_nano_per_token(text) == nano


@pytest.mark.parametrize("text", ["0.0005", "-0.35", "cheap"])
def test_a_price_the_unit_cannot_hold_is_refused(text: str) -> None:
    with pytest.raises(MoneyError):
        money.per_million_to_nano_per_token(text)


@pytest.mark.parametrize(
    ("text", "canonical"), [("0.35", "0.35"), ("1.4", "1.40"), ("2", "2.00"), ("0.125", "0.125")]
)
def test_format_price(text: str, canonical: str) -> None:
    assert money.format_price(text) == canonical
