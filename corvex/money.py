"""Money: integer nano-USD (1e-9 USD), and exact conversion to and from decimal text.

Every amount that moves is an `int` of nano-USD; floats never touch money. The unit is fine
enough that every catalogue price is a whole number per token ($0.35 / 1M tokens = 350
nano-USD per token) and coarse enough that a year of spend fits an int64 many times over.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

NANO_PER_USD = 1_000_000_000
NANO_PER_CENT = 10_000_000
# A price "per 1M tokens" in USD is this many nano-USD per token per dollar.
NANO_PER_TOKEN_PER_USD_PER_MILLION = NANO_PER_USD // 1_000_000


class MoneyError(ValueError):
    """Text that is not an exact amount of the unit it must be in."""


def _decimal(text: str) -> Decimal:
    text = text.strip().removeprefix("$")
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise MoneyError(f"`{text}` is not a decimal number") from None
    if not value.is_finite():
        raise MoneyError(f"`{text}` is not a finite number")
    return value


def cents_from_usd(text: str) -> int:
    """Whole cents of a USD text ("25.00" → 2500). Rejects fractions of a cent and negatives."""
    cents = _decimal(text) * 100
    if cents != cents.to_integral_value():
        raise MoneyError(f"${text.strip()} is not a whole number of cents")
    if cents < 0:
        raise MoneyError(f"${text.strip()} is negative")
    return int(cents)


def usd_to_nano(text: str) -> int:
    """Nano-USD of a USD text ("2.52" → 2_520_000_000), exactly or not at all."""
    nano = _decimal(text) * NANO_PER_USD
    if nano != nano.to_integral_value():
        raise MoneyError(f"${text.strip()} is not a whole number of nano-USD (9 decimal places)")
    if nano < 0:
        raise MoneyError(f"${text.strip()} is negative")
    return int(nano)


def per_million_to_nano_per_token(text: str) -> int:
    """Nano-USD per token of a price in USD per 1M tokens ("0.35" → 350), exactly or not at all."""
    per_token = _decimal(text) * NANO_PER_TOKEN_PER_USD_PER_MILLION
    if per_token != per_token.to_integral_value():
        raise MoneyError(
            f"${text} per 1M tokens is not a whole number of nano-USD per token "
            "(at most 3 decimal places)"
        )
    if per_token < 0:
        raise MoneyError(f"${text} per 1M tokens is negative")
    return int(per_token)


def format_usd(nano: int, *, min_places: int = 2) -> str:
    """Exact decimal USD text of a nano-USD amount, without trailing zeros past `min_places`.

    format_usd(52_500) == "0.0000525"; format_usd(25 * NANO_PER_USD) == "25.00".
    """
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO_PER_USD)
    digits = f"{frac:09d}".rstrip("0")
    digits = digits.ljust(min_places, "0")
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"


def format_price(text: str) -> str:
    """Canonical text of a per-1M price: at least 2 decimals, no trailing zeros beyond that."""
    value = _decimal(text)
    exponent = value.normalize().as_tuple().exponent
    assert isinstance(exponent, int)  # finite, checked by _decimal
    return f"{value:.{max(2, -exponent)}f}"
