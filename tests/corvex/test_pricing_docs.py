"""The pricing page's rate table: generated from the rate card, read back strictly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from corvex import drift_gate, pricing_docs
from corvex.pricing_docs import (
    PageRow,
    PricingPageError,
    ReservedRow,
    parse_reserved_table,
    parse_table,
)
from corvex.ratecard import load_rate_card

REPO = Path(__file__).resolve().parents[2]
RATE_CARD = REPO / "infrastructure" / "metronome" / "config.yaml"
PAGE = REPO / "docs" / "pricing.md"
DEEPSEEK_ROW = (
    "| DeepSeek V4 Flash | $0.35 / 1M | $1.40 / 1M | /models/deepseek-ai/DeepSeek-V4-Flash |"
)


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"expected exactly one `{old}`"
    return text.replace(old, new)


@pytest.fixture
def page(tmp_path: Path) -> Path:
    """A copy of the committed page, so no test can change the real one."""
    copy = tmp_path / "pricing.md"
    shutil.copyfile(PAGE, copy)
    return copy


@pytest.fixture
def rate_card(tmp_path: Path) -> Path:
    copy = tmp_path / "config.yaml"
    shutil.copyfile(RATE_CARD, copy)
    return copy


def test_committed_page_is_current_with_committed_rate_card() -> None:
    before = PAGE.read_text(encoding="utf-8")
    assert pricing_docs.run(rate_card=RATE_CARD, page=PAGE, check=True) == 0
    assert PAGE.read_text(encoding="utf-8") == before


def test_committed_table_lists_the_rate_card_in_order() -> None:
    card = load_rate_card(RATE_CARD)
    table = parse_table(PAGE.read_text(encoding="utf-8"))
    assert table.version == card.version
    assert table.rows == [
        PageRow(m.name, m.input_usd_per_million, m.output_usd_per_million, m.card_path)
        for m in card.models
    ]
    assert [row.name for row in table.rows] == [m.name for m in card.models]
    assert DEEPSEEK_ROW in PAGE.read_text(encoding="utf-8")


def test_generation_is_idempotent(page: Path) -> None:
    assert pricing_docs.run(rate_card=RATE_CARD, page=page, check=False) == 0
    once = page.read_text(encoding="utf-8")
    assert pricing_docs.run(rate_card=RATE_CARD, page=page, check=False) == 0
    assert page.read_text(encoding="utf-8") == once == PAGE.read_text(encoding="utf-8")


def test_generation_rewrites_only_the_marked_blocks(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    before = "# Title\n\nHand-written | prose with $9.99 / 1M in it.\n\n"
    begin = "<!-- rate-table:begin (generated; do not edit) -->\n"
    between = "<!-- rate-table:end -->\n\nMore prose, $2.52 an hour.\n"
    reserved_begin = "<!-- reserved-table:begin (generated) -->\n"
    after = "<!-- reserved-table:end -->\n\nThe end.\n"
    stale = "stale text\n| old | row |\n"
    page.write_text(
        before + begin + stale + between + reserved_begin + stale + after, encoding="utf-8"
    )

    assert pricing_docs.run(rate_card=RATE_CARD, page=page, check=False) == 0

    text = page.read_text(encoding="utf-8")
    card = load_rate_card(RATE_CARD)
    assert text.startswith(before + begin)
    assert text.endswith(after)
    assert "stale text" not in text
    rates, reserved = text[len(before + begin) : -len(after)].split(between + reserved_begin)
    assert rates.splitlines() == pricing_docs.render_block(card)
    assert reserved.splitlines() == pricing_docs.render_reserved_block(card)


def test_check_names_model_and_field_and_leaves_the_page(
    page: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale_row = DEEPSEEK_ROW.replace("$0.35", "$0.36")
    stale = _replace_once(page.read_text(encoding="utf-8"), DEEPSEEK_ROW, stale_row)
    page.write_text(stale, encoding="utf-8")

    assert pricing_docs.run(rate_card=RATE_CARD, page=page, check=True) == 1

    out = capsys.readouterr().out
    assert (
        f"drift: {page}: DeepSeek V4 Flash: input price $0.36 on the page, $0.35 on the rate card"
    ) in out
    assert "-| DeepSeek V4 Flash | $0.36 / 1M" in out
    assert "+| DeepSeek V4 Flash | $0.35 / 1M" in out
    assert page.read_text(encoding="utf-8") == stale


def test_check_fails_on_reordered_rows_that_the_gate_accepts(page: Path) -> None:
    # Order is not a drift in prices, but the generated page is in rate-card order.
    glm = "| GLM 5.1 FP8 | $0.50 / 1M | $2.00 / 1M | /models/zai-org/GLM-5.1-FP8 |"
    text = _replace_once(page.read_text(encoding="utf-8"), glm + "\n", "")
    page.write_text(_replace_once(text, DEEPSEEK_ROW, f"{DEEPSEEK_ROW}\n{glm}"), encoding="utf-8")

    assert drift_gate.run(rate_card=RATE_CARD, page=page, served_url=None) == 0
    assert pricing_docs.run(rate_card=RATE_CARD, page=page, check=True) == 1


def test_rate_card_change_then_generate_makes_the_gate_clean(
    page: Path, rate_card: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card_text = rate_card.read_text(encoding="utf-8")
    card_text = _replace_once(card_text, '"0.35"', '"0.36"')
    card_text = _replace_once(card_text, 'version: "2026-11-01"', 'version: "2026-12-01"')
    rate_card.write_text(card_text, encoding="utf-8")

    assert drift_gate.run(rate_card=rate_card, page=page, served_url=None) == 1
    out = capsys.readouterr().out
    assert "DeepSeek V4 Flash: input price $0.35 on the page, $0.36 on the rate card" in out
    assert "rate card version 2026-11-01 on the page, 2026-12-01 on the rate card" in out

    assert pricing_docs.run(rate_card=rate_card, page=page, check=False) == 0

    assert drift_gate.run(rate_card=rate_card, page=page, served_url=None) == 0
    assert pricing_docs.run(rate_card=rate_card, page=page, check=True) == 0
    assert DEEPSEEK_ROW.replace("$0.35", "$0.36") in page.read_text(encoding="utf-8")
    assert "Rate card version `2026-12-01`" in page.read_text(encoding="utf-8")


def test_page_without_markers_is_an_error_and_not_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Pricing\n\nNo table here.\n", encoding="utf-8")

    assert pricing_docs.run(rate_card=RATE_CARD, page=page, check=False) == 2

    assert "rate-table:begin" in capsys.readouterr().err
    assert page.read_text(encoding="utf-8") == "# Pricing\n\nNo table here.\n"


def test_a_name_that_would_break_the_table_is_refused(page: Path, rate_card: Path) -> None:
    text = rate_card.read_text(encoding="utf-8")
    rate_card.write_text(_replace_once(text, "name: GLM 5.1 FP8", 'name: "GLM | 5.1"'), "utf-8")
    before = page.read_text(encoding="utf-8")

    assert pricing_docs.run(rate_card=rate_card, page=page, check=False) == 2
    assert page.read_text(encoding="utf-8") == before


def _block(*lines: str) -> str:
    """A page whose marked block holds `lines`, starting on line 4 of the page."""
    body = "\n".join(lines)
    return f"# Pricing\n\n<!-- rate-table:begin (generated) -->\n{body}\n<!-- rate-table:end -->\n"


_VERSION = "Rate card version `2026-11-01`; prices are in USD per 1M tokens."
_HEAD = ("| Model | Input | Output | Card |", "|---|---|---|---|")


def test_parser_reads_rows_and_allows_blank_lines() -> None:
    text = _block("", _VERSION, "", *_HEAD, DEEPSEEK_ROW, "")
    table = parse_table(text)
    assert table.version == "2026-11-01"
    assert table.rows == [
        PageRow("DeepSeek V4 Flash", "0.35", "1.40", "/models/deepseek-ai/DeepSeek-V4-Flash")
    ]


@pytest.mark.parametrize(
    ("lines", "line", "words"),
    [
        ((_VERSION, *_HEAD, "| DeepSeek V4 Flash | $0.35 / 1M | $1.40 / 1M |"), 7, "4 cells"),
        ((_VERSION, *_HEAD, "| DeepSeek V4 Flash | 0.35 | $1.40 / 1M | /models/a/b |"), 7, "input"),
        (
            (_VERSION, *_HEAD, "| DeepSeek V4 Flash | $0.35 / 1M | $1.40/1M | /models/a/b |"),
            7,
            "output",
        ),
        (
            (_VERSION, *_HEAD, "| DeepSeek V4 Flash | $0.35 / 1M | $1.40 / 1M | models/a/b |"),
            7,
            "card",
        ),
        ((_VERSION, *_HEAD, "|  | $0.35 / 1M | $1.40 / 1M | /models/a/b |"), 7, "name is empty"),
        ((_VERSION, *_HEAD, "DeepSeek V4 Flash, $0.35, $1.40"), 7, "start and end"),
        ((_VERSION, *_HEAD, DEEPSEEK_ROW, "some prose"), 8, "start and end"),
        ((_VERSION, *_HEAD, DEEPSEEK_ROW, DEEPSEEK_ROW), 8, "listed twice (first on line 7)"),
        ((_VERSION, "| Model | Input | Output |", _HEAD[1]), 5, "expected"),
        ((*_HEAD, DEEPSEEK_ROW), 4, "version line"),
        ((_VERSION, _HEAD[0]), 6, "|---|---|---|---|"),
    ],
)
def test_parser_names_the_line_of_a_malformed_table(
    lines: tuple[str, ...], line: int, words: str
) -> None:
    with pytest.raises(PricingPageError) as raised:
        parse_table(_block(*lines), source="page.md")
    assert f"page.md:{line}:" in str(raised.value)
    assert words in str(raised.value)


@pytest.mark.parametrize(
    "text",
    [
        "no markers at all\n",
        _block(_VERSION, *_HEAD) + "<!-- rate-table:begin again -->\n",
        "<!-- rate-table:end -->\n<!-- rate-table:begin -->\n",
    ],
)
def test_parser_needs_one_pair_of_markers_in_order(text: str) -> None:
    with pytest.raises(PricingPageError, match=r"^page\.md:"):
        parse_table(text, source="page.md")


def test_committed_reserved_table_lists_the_offerings_in_order() -> None:
    card = load_rate_card(RATE_CARD)
    table = parse_reserved_table(PAGE.read_text(encoding="utf-8"))
    assert table.version == card.version
    assert table.rows == [
        ReservedRow(
            o.id,
            card.by_id[o.model].name,
            o.gpus_per_replica,
            o.usd_per_replica_hour,
            o.minimum_hours,
        )
        for o in card.reserved
    ]
    text = PAGE.read_text(encoding="utf-8")
    assert "| `glm-5.1-fp8-8gpu` | GLM 5.1 FP8 | 8 | $20.16 | 1 hour |" in text
    assert "accrued by the minute" in text


def test_check_names_a_stale_reserved_price(page: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row = "| `deepseek-v4-flash-1gpu` | DeepSeek V4 Flash | 1 | $2.52 | none |"
    page.write_text(
        _replace_once(page.read_text(encoding="utf-8"), row, row.replace("$2.52", "$2.40")),
        encoding="utf-8",
    )

    assert pricing_docs.run(rate_card=RATE_CARD, page=page, check=True) == 1

    out = capsys.readouterr().out
    assert (
        f"drift: {page}: deepseek-v4-flash-1gpu: price per replica-hour $2.40 on the page, "
        "$2.52 on the rate card"
    ) in out


def _reserved_block(*lines: str) -> str:
    body = "\n".join(lines)
    return (
        "# Pricing\n\n<!-- reserved-table:begin (generated) -->\n"
        f"{body}\n<!-- reserved-table:end -->\n"
    )


_RESERVED_VERSION = (
    "Rate card version `2026-11-01`; prices are in USD per replica-hour, accrued by the minute."
)
_RESERVED_HEAD = (
    "| Offering | Model | GPUs per replica | Per replica-hour | Minimum term |",
    "|---|---|---|---|---|",
)
_FLASH = "| `deepseek-v4-flash-1gpu` | DeepSeek V4 Flash | 1 | $2.52 | none |"


def test_reserved_parser_reads_terms() -> None:
    glm = "| `glm-5.1-fp8-8gpu` | GLM 5.1 FP8 | 8 | $20.16 | 2 hours |"
    table = parse_reserved_table(_reserved_block(_RESERVED_VERSION, *_RESERVED_HEAD, _FLASH, glm))
    assert table.rows == [
        ReservedRow("deepseek-v4-flash-1gpu", "DeepSeek V4 Flash", 1, "2.52", 0),
        ReservedRow("glm-5.1-fp8-8gpu", "GLM 5.1 FP8", 8, "20.16", 2),
    ]


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ("| deepseek-v4-flash-1gpu | DeepSeek V4 Flash | 1 | $2.52 | none |", "offering"),
        ("| `deepseek-v4-flash-1gpu` |  | 1 | $2.52 | none |", "name is empty"),
        ("| `deepseek-v4-flash-1gpu` | DeepSeek V4 Flash | one | $2.52 | none |", "GPUs"),
        ("| `deepseek-v4-flash-1gpu` | DeepSeek V4 Flash | 1 | 2.52 | none |", "price"),
        ("| `deepseek-v4-flash-1gpu` | DeepSeek V4 Flash | 1 | $2.52 | 1 day |", "minimum term"),
        ("| `deepseek-v4-flash-1gpu` | DeepSeek V4 Flash | 1 | $2.52 |", "5 cells"),
        (_FLASH + "\n" + _FLASH, "listed twice"),
    ],
)
def test_reserved_parser_names_the_line_of_a_malformed_row(row: str, words: str) -> None:
    with pytest.raises(PricingPageError) as raised:
        parse_reserved_table(
            _reserved_block(_RESERVED_VERSION, *_RESERVED_HEAD, row), source="page.md"
        )
    assert "page.md:" in str(raised.value) and words in str(raised.value)
