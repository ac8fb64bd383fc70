"""The rate card: the committed card is valid, and every kind of mistake is refused with the
file and line that holds it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from corvex.ratecard import RateCardError, load_rate_card, parse_rate_card

CARD = Path("infrastructure/metronome/config.yaml")
GOOD = """version: "v1"
currency: USD
models:
  - id: org/a
    name: A
    card: /models/org/a
    input_usd_per_million: "0.35"
    output_usd_per_million: "1.40"
    context_length: 1000
    listed: 2026-01-01
"""


def test_the_committed_card_matches_the_pricing_page_promises() -> None:
    card = load_rate_card(CARD)
    prices = {m.name: (m.input_usd_per_million, m.output_usd_per_million) for m in card.models}
    assert prices == {
        "GLM 5.1 FP8": ("0.50", "2.00"),
        "Kimi K2.6": ("0.55", "2.20"),
        "MiniMax M2.5": ("0.45", "1.80"),
        "DeepSeek V4 Flash": ("0.35", "1.40"),
    }
    flash = card.get("deepseek-ai/DeepSeek-V4-Flash")
    assert flash is not None
    assert (flash.input_nano_per_token, flash.output_nano_per_token) == (350, 1400)
    assert flash.cost_nano(1_000_000, 1_000_000) == 1_750_000_000  # $0.35 + $1.40


def test_prices_are_read_from_the_text_not_through_floats() -> None:
    card = parse_rate_card(GOOD.replace('"0.35"', "0.355"))
    assert card.models[0].input_nano_per_token == 355
    assert card.models[0].input_usd_per_million == "0.355"


@pytest.mark.parametrize(
    ("change", "line", "message"),
    [
        (("currency: USD", "currency: USD\ndiscount: 5"), 3, "unknown key `discount`"),
        (("    listed:", "    colour: red\n    listed:"), 10, "unknown key `colour`"),
        (('"0.35"', '"-0.35"'), 7, "negative"),
        (('"0.35"', '"0.3555"'), 7, "not a whole number of nano-USD"),
        (('"1.40"', '"cheap"'), 8, "not a decimal number"),
        (("context_length: 1000", "context_length: -5"), 9, "context_length"),
        (("card: /models/org/a", "card: /models/org/b"), 6, "card must be /models/org/a"),
        (("id: org/a", "id: just-a-name"), 4, "org/name"),
        (("listed: 2026-01-01", "listed: soon"), 10, "listed must be a date"),
        (("currency: USD", "currency: EUR"), 2, "currency must be USD"),
        (("    name: A\n", ""), 4, "missing name"),
    ],
)
def test_mistakes_name_their_line(change: tuple[str, str], line: int, message: str) -> None:
    with pytest.raises(RateCardError, match=rf"^card.yaml:{line}: .*{re.escape(message)}"):
        parse_rate_card(GOOD.replace(*change), source="card.yaml")


def test_duplicate_ids_name_both_lines() -> None:
    entry = GOOD[GOOD.index("  - id:") :]
    with pytest.raises(
        RateCardError, match=r"card.yaml:11: duplicate model id org/a \(first on line 4\)"
    ):
        parse_rate_card(GOOD + entry, source="card.yaml")


def test_broken_yaml_and_missing_files() -> None:
    with pytest.raises(RateCardError, match="not valid YAML"):
        parse_rate_card("models: [", source="card.yaml")
    with pytest.raises(RateCardError, match="cannot read"):
        load_rate_card("no/such/card.yaml")
