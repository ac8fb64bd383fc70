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


RESERVED = """reserved:
  - id: a-1gpu
    model: org/a
    gpus_per_replica: 1
    usd_per_replica_hour: "2.52"
    minimum_hours: 1
"""


def test_the_committed_card_prices_reserved_replicas_exactly_by_the_minute() -> None:
    card = load_rate_card(CARD)
    assert [o.model for o in card.reserved] == [
        "deepseek-ai/DeepSeek-V4-Flash",
        "MiniMaxAI/MiniMax-M2.5",
        "zai-org/GLM-5.1-FP8",
        "moonshotai/Kimi-K2.6",
    ]
    flash = card.offerings["deepseek-v4-flash-1gpu"]
    assert (flash.gpus_per_replica, flash.usd_per_replica_hour, flash.minimum_hours) == (
        1,
        "2.52",
        0,
    )
    # $2.52 an hour is $0.042 a minute, and sixty minutes are the hour to the nano-dollar.
    assert flash.nano_per_replica_period(60) == 42_000_000
    assert flash.nano_per_replica_period(60) * 60 == flash.nano_per_replica_hour
    assert card.offerings_of("deepseek-ai/DeepSeek-V4-Flash") == [flash]
    # The example prices also split into whole seconds, so tests may shorten the period.
    assert all(o.nano_per_replica_hour % 3600 == 0 for o in card.reserved)


def test_a_card_without_reserved_offerings_is_valid() -> None:
    card = parse_rate_card(GOOD)
    assert card.reserved == () and card.offerings == {}


def test_an_offering_parses_and_splits_its_price() -> None:
    offering = parse_rate_card(GOOD + RESERVED).offerings["a-1gpu"]
    assert offering.nano_per_replica_hour == 2_520_000_000
    assert offering.nano_per_replica_period(1) == 700_000
    cheap = parse_rate_card(GOOD + RESERVED.replace('"2.52"', '"2.49"')).offerings["a-1gpu"]
    with pytest.raises(ValueError, match="not a whole number of nano-USD per 1 s"):
        cheap.nano_per_replica_period(1)
    assert cheap.nano_per_replica_period(60) == 41_500_000


@pytest.mark.parametrize(
    ("change", "line", "message"),
    [
        (('"2.52"', '"2.50"'), 15, "not a whole number of nano-USD per minute"),
        (('"2.52"', '"0"'), 15, "must be positive"),
        (('"2.52"', '"2.5200000001"'), 15, "not a whole number of nano-USD"),
        (("model: org/a", "model: org/b"), 13, "model org/b is not in `models`"),
        (("gpus_per_replica: 1", "gpus_per_replica: 0"), 14, "gpus_per_replica"),
        (("gpus_per_replica: 1", "gpus_per_replica: 65"), 14, "from 1 to 64"),
        (("minimum_hours: 1", "minimum_hours: one"), 16, "minimum_hours"),
        (("id: a-1gpu", "id: A_1"), 12, "offering id"),
        (("    minimum_hours: 1\n", "    colour: red\n"), 16, "unknown key `colour`"),
        (("    gpus_per_replica: 1\n", ""), 12, "missing gpus_per_replica"),
    ],
)
def test_reserved_mistakes_name_their_line(
    change: tuple[str, str], line: int, message: str
) -> None:
    with pytest.raises(RateCardError, match=rf"^card.yaml:{line}: .*{re.escape(message)}"):
        parse_rate_card(GOOD + RESERVED.replace(*change), source="card.yaml")


def test_duplicate_offerings_name_both_lines() -> None:
    entry = RESERVED[RESERVED.index("  - id:") :]
    with pytest.raises(RateCardError, match=r"card.yaml:17: duplicate offering id a-1gpu"):
        parse_rate_card(GOOD + RESERVED + entry, source="card.yaml")
