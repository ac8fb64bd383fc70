"""The rate tables of the pricing page (docs/pricing.md): generated from the rate card, read back.

It owns the tables' format: the per-token rate table and the reserved-endpoint table. It writes
only the text between each table's markers and parses that text back, strictly. It never
touches the hand-written prose around the markers, and it never writes a price down that the
rate card did not give it.
"""

from __future__ import annotations

import difflib
import html
import re
import sys
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path

import msgspec

from corvex.ratecard import RateCard, RateCardError, load_rate_card

BEGIN_MARKER = "<!-- rate-table:begin"
END_MARKER = "<!-- rate-table:end -->"
TABLE_HEADER = "| Model | Input | Output | Card |"
TABLE_RULE = "|---|---|---|---|"
_COLUMNS = 4
_VERSION_LINE = re.compile(
    r"^Rate card version `(?P<version>[^`]+)`; prices are in USD per 1M tokens\.$"
)
_PRICE_CELL = re.compile(r"^\$(?P<amount>\d+(?:\.\d+)?) / 1M$")
_CARD_CELL = re.compile(r"^/models/[^\s|/]+/[^\s|/]+$")
RESERVED_BEGIN_MARKER = "<!-- reserved-table:begin"
RESERVED_END_MARKER = "<!-- reserved-table:end -->"
RESERVED_HEADER = "| Offering | Model | GPUs per replica | Per replica-hour | Minimum term |"
RESERVED_RULE = "|---|---|---|---|---|"
_RESERVED_COLUMNS = 5
_RESERVED_VERSION_LINE = re.compile(
    r"^Rate card version `(?P<version>[^`]+)`; prices are in USD per replica-hour, "
    r"accrued by the minute\.$"
)
_OFFERING_CELL = re.compile(r"^`(?P<id>[a-z0-9.-]+)`$")
_HOURLY_CELL = re.compile(r"^\$(?P<amount>\d+(?:\.\d+)?)$")
_TERM_CELL = re.compile(r"^(?:none|(?P<hours>[1-9]\d*) hours?)$")


class PricingPageError(ValueError):
    """The pricing page cannot be read or written. The message names the file and line."""


class PageRow(msgspec.Struct, frozen=True):
    """One row of the page's rate table, as written (prices are decimal text without `$`)."""

    name: str
    input_usd_per_million: str
    output_usd_per_million: str
    card_path: str


class RateTable(msgspec.Struct, frozen=True):
    """What the marked block of a page says: the rate-card version and the rows in order."""

    version: str
    rows: list[PageRow]


class ReservedRow(msgspec.Struct, frozen=True):
    """One row of the page's reserved-endpoint table, as written."""

    offering: str
    model_name: str
    gpus_per_replica: int
    usd_per_replica_hour: str
    minimum_hours: int


class ReservedTable(msgspec.Struct, frozen=True):
    """What the reserved block of a page says: the rate-card version and the rows in order."""

    version: str
    rows: list[ReservedRow]


def page_rows(card: RateCard) -> list[PageRow]:
    """The table's rows, in rate-card order: what both the Markdown and the HTML table show."""
    return [
        PageRow(m.name, m.input_usd_per_million, m.output_usd_per_million, m.card_path)
        for m in card.models
    ]


def _cells(row: PageRow) -> tuple[str, str, str, str]:
    """The four cells of a row as the page writes them ("$0.35 / 1M")."""
    return (
        row.name,
        f"${row.input_usd_per_million} / 1M",
        f"${row.output_usd_per_million} / 1M",
        row.card_path,
    )


def _version_line(version: str) -> str:
    return f"Rate card version `{version}`; prices are in USD per 1M tokens."


def render_block(card: RateCard) -> list[str]:
    """The lines that belong between the markers, in rate-card order."""
    lines = ["", _version_line(card.version), "", TABLE_HEADER, TABLE_RULE]
    for row in page_rows(card):
        # A `|` or a line break in a name would split the row; the rate card allows neither
        # today, but the table must never silently turn into something else.
        if "|" in row.name or "\n" in row.name:
            raise PricingPageError(f"model {row.name}: its name cannot go in a table cell")
        lines.append("| " + " | ".join(_cells(row)) + " |")
    lines.append("")
    return lines


def reserved_rows(card: RateCard) -> list[ReservedRow]:
    """The reserved table's rows, in rate-card order (Markdown and HTML alike)."""
    return [
        ReservedRow(
            o.id, card.by_id[o.model].name, o.gpus_per_replica, o.usd_per_replica_hour,
            o.minimum_hours,
        )
        for o in card.reserved
    ]  # fmt: skip


def _reserved_cells(row: ReservedRow) -> tuple[str, str, str, str, str]:
    return (
        f"`{row.offering}`",
        row.model_name,
        str(row.gpus_per_replica),
        f"${row.usd_per_replica_hour}",
        _term(row.minimum_hours),
    )


def render_reserved_block(card: RateCard) -> list[str]:
    """The lines that belong between the reserved markers, in rate-card order."""
    lines = [
        "",
        f"Rate card version `{card.version}`; prices are in USD per replica-hour, accrued by the "
        "minute.",
        "",
        RESERVED_HEADER,
        RESERVED_RULE,
    ]
    for row in reserved_rows(card):
        if "|" in row.model_name or "\n" in row.model_name:
            raise PricingPageError(f"model {row.model_name}: its name cannot go in a table cell")
        lines.append("| " + " | ".join(_reserved_cells(row)) + " |")
    lines.append("")
    return lines


def _term(hours: int) -> str:
    if hours == 0:
        return "none"
    return f"{hours} hour" if hours == 1 else f"{hours} hours"


HTML_TABLE_ID = "rate-table"
RESERVED_HTML_TABLE_ID = "reserved-table"


def render_html(version: str, rows: Sequence[PageRow], reserved: Sequence[ReservedRow] = ()) -> str:
    """The same tables as HTML, for the served /pricing page (the edge builds the rows from the
    catalogue it serves; the drift gate reads them back with `parse_html` and
    `parse_reserved_html`). Card cells link to the model cards."""
    esc = html.escape
    body = []
    for row in rows:
        name, input_cell, output_cell, card = (esc(c) for c in _cells(row))
        body.append(
            f"<tr><td>{name}</td><td>{input_cell}</td><td>{output_cell}</td>"
            f'<td><a href="{card}">{card}</a></td></tr>'
        )
    headers = "".join(f"<th>{h}</th>" for h in ("Model", "Input", "Output", "Card"))
    page = (
        f'<p class="rate-version" data-version="{esc(version)}">Rate card version '
        f"<code>{esc(version)}</code>; prices are in USD per 1M tokens.</p>\n"
        f'<table id="{HTML_TABLE_ID}"><thead><tr>{headers}</tr></thead><tbody>\n'
        + "\n".join(body)
        + "\n</tbody></table>"
    )
    if not reserved:
        return page
    reserved_body = []
    for r in reserved:
        offering, *rest = (esc(c) for c in _reserved_cells(r))
        cells = "".join(f"<td>{c}</td>" for c in rest)
        reserved_body.append(f"<tr><td><code>{offering.strip('`')}</code></td>{cells}</tr>")
    columns = ("Offering", "Model", "GPUs per replica", "Per replica-hour", "Minimum term")
    headers = "".join(f"<th>{h}</th>" for h in columns)
    return (
        page
        + f'\n<p class="rate-version" data-reserved-version="{esc(version)}">Rate card version '
        f"<code>{esc(version)}</code>; prices are in USD per replica-hour, accrued by the "
        "minute.</p>\n"
        f'<table id="{RESERVED_HTML_TABLE_ID}"><thead><tr>{headers}</tr></thead><tbody>\n'
        + "\n".join(reserved_body)
        + "\n</tbody></table>"
    )


class _TableReader(HTMLParser):
    """Collects the version and the body cells of one table of a served page."""

    def __init__(self, table_id: str, version_attribute: str) -> None:
        super().__init__()
        self._table_id = table_id
        self._version_attribute = version_attribute
        self.version: str | None = None
        self.rows: list[list[str]] = []
        self._in_table = self._in_body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "p" and self._version_attribute in found:
            self.version = found[self._version_attribute]
        elif tag == "table" and found.get("id") == self._table_id:
            self._in_table = True
        elif self._in_table and tag == "tbody":
            self._in_body = True
        elif self._in_body and tag == "tr":
            self.rows.append([])
        elif self._in_body and tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._in_table = self._in_body = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _read(page_html: str, table_id: str, version_attribute: str, source: str) -> _TableReader:
    reader = _TableReader(table_id, version_attribute)
    reader.feed(page_html)
    reader.close()
    if reader.version is None:
        raise PricingPageError(f"{source}: the page has no {table_id} version line")
    return reader


def parse_html(page_html: str, *, source: str = "/pricing") -> RateTable:
    """Reads the rate table back from a served page, as strictly as `parse_table` reads the
    Markdown one (each row through the same cell rules)."""
    reader = _read(page_html, HTML_TABLE_ID, "data-version", source)
    assert reader.version is not None
    lines = [(n, "| " + " | ".join(cells) + " |") for n, cells in enumerate(reader.rows, 1)]
    return RateTable(version=reader.version, rows=_parse_rows(lines, f"{source} row"))


def parse_reserved_html(page_html: str, *, source: str = "/pricing") -> ReservedTable:
    """Reads the reserved table back from a served page, through the Markdown row rules."""
    reader = _read(page_html, RESERVED_HTML_TABLE_ID, "data-reserved-version", source)
    assert reader.version is not None
    rows = []
    for n, cells in enumerate(reader.rows, 1):
        first, *rest = cells or [""]
        line = "| " + " | ".join([f"`{first}`", *rest]) + " |"
        rows.append(_parse_reserved_row(line, f"{source} reserved row {n}"))
    return ReservedTable(version=reader.version, rows=rows)


def _find_markers(
    lines: list[str], source: str, begin_marker: str = BEGIN_MARKER, end_marker: str = END_MARKER
) -> tuple[int, int]:
    """Indexes of the begin and end marker lines; exactly one of each, in that order."""
    begins = [i for i, line in enumerate(lines) if line.startswith(begin_marker)]
    ends = [i for i, line in enumerate(lines) if line.strip() == end_marker]
    if len(begins) != 1 or len(ends) != 1:
        raise PricingPageError(
            f"{source}: expected one `{begin_marker} ... -->` line and one `{end_marker}` line, "
            f"found {len(begins)} and {len(ends)}"
        )
    begin, end = begins[0], ends[0]
    if end < begin:
        raise PricingPageError(f"{source}:{end + 1}: the end marker comes before the begin marker")
    return begin, end


def parse_table(page_text: str, *, source: str = "docs/pricing.md") -> RateTable:
    """Reads the block between the markers: the version line, the header, the rule, the rows.

    Blank lines may come anywhere; any other text is an error naming its line.
    """
    lines = page_text.splitlines()
    begin, end = _find_markers(lines, source)
    body = [(i + 1, lines[i].strip()) for i in range(begin + 1, end) if lines[i].strip()]
    preamble = ("`Rate card version ...`", f"`{TABLE_HEADER}`", f"`{TABLE_RULE}`")
    if len(body) < len(preamble):
        missing = preamble[len(body)]
        raise PricingPageError(f"{source}:{end + 1}: the block has no {missing} line")
    (version_number, version_line), *table = body
    version = _VERSION_LINE.match(version_line)
    if version is None:
        raise PricingPageError(
            f"{source}:{version_number}: expected the version line, not `{version_line}`"
        )
    for (number, line), expected in zip(table[:2], (TABLE_HEADER, TABLE_RULE), strict=True):
        if line != expected:
            raise PricingPageError(f"{source}:{number}: expected `{expected}`, found `{line}`")
    return RateTable(version=version["version"], rows=_parse_rows(table[2:], source))


def _parse_rows(numbered_lines: list[tuple[int, str]], source: str) -> list[PageRow]:
    rows: list[PageRow] = []
    first_line: dict[tuple[str, str], int] = {}
    for number, line in numbered_lines:
        row = _parse_row(line, f"{source}:{number}")
        for key in (("name", row.name), ("card", row.card_path)):
            if key in first_line:
                raise PricingPageError(
                    f"{source}:{number}: {key[1]} is listed twice (first on line {first_line[key]})"
                )
            first_line[key] = number
        rows.append(row)
    return rows


def _parse_row(line: str, where: str) -> PageRow:
    if not (line.startswith("|") and line.endswith("|")):
        raise PricingPageError(f"{where}: a table row must start and end with `|`: `{line}`")
    cells = [cell.strip() for cell in line[1:-1].split("|")]
    if len(cells) != _COLUMNS:
        raise PricingPageError(
            f"{where}: expected {_COLUMNS} cells (Model | Input | Output | Card), "
            f"found {len(cells)}: `{line}`"
        )
    name, input_cell, output_cell, card = cells
    if not name:
        raise PricingPageError(f"{where}: the model name is empty")
    prices = []
    for column, cell in (("input", input_cell), ("output", output_cell)):
        match = _PRICE_CELL.match(cell)
        if match is None:
            raise PricingPageError(
                f"{where}: {name}: {column} price must look like `$0.35 / 1M`, not `{cell}`"
            )
        prices.append(match["amount"])
    if _CARD_CELL.match(card) is None:
        raise PricingPageError(
            f"{where}: {name}: card must look like `/models/<org>/<name>`, not `{card}`"
        )
    return PageRow(name, prices[0], prices[1], card)


def parse_reserved_table(page_text: str, *, source: str = "docs/pricing.md") -> ReservedTable:
    """Reads the reserved block: the version line, the header, the rule, the rows."""
    lines = page_text.splitlines()
    begin, end = _find_markers(lines, source, RESERVED_BEGIN_MARKER, RESERVED_END_MARKER)
    body = [(i + 1, lines[i].strip()) for i in range(begin + 1, end) if lines[i].strip()]
    preamble = ("`Rate card version ...`", f"`{RESERVED_HEADER}`", f"`{RESERVED_RULE}`")
    if len(body) < len(preamble):
        missing = preamble[len(body)]
        raise PricingPageError(f"{source}:{end + 1}: the reserved block has no {missing} line")
    (version_number, version_line), *table = body
    version = _RESERVED_VERSION_LINE.match(version_line)
    if version is None:
        raise PricingPageError(
            f"{source}:{version_number}: expected the reserved version line, not `{version_line}`"
        )
    for (number, line), expected in zip(table[:2], (RESERVED_HEADER, RESERVED_RULE), strict=True):
        if line != expected:
            raise PricingPageError(f"{source}:{number}: expected `{expected}`, found `{line}`")
    rows: list[ReservedRow] = []
    first_line: dict[str, int] = {}
    for number, line in table[2:]:
        row = _parse_reserved_row(line, f"{source}:{number}")
        if row.offering in first_line:
            raise PricingPageError(
                f"{source}:{number}: {row.offering} is listed twice "
                f"(first on line {first_line[row.offering]})"
            )
        first_line[row.offering] = number
        rows.append(row)
    return ReservedTable(version=version["version"], rows=rows)


def _parse_reserved_row(line: str, where: str) -> ReservedRow:
    if not (line.startswith("|") and line.endswith("|")):
        raise PricingPageError(f"{where}: a table row must start and end with `|`: `{line}`")
    cells = [cell.strip() for cell in line[1:-1].split("|")]
    if len(cells) != _RESERVED_COLUMNS:
        raise PricingPageError(
            f"{where}: expected {_RESERVED_COLUMNS} cells (Offering | Model | GPUs per replica "
            f"| Per replica-hour | Minimum term), found {len(cells)}: `{line}`"
        )
    offering_cell, name, gpus, price_cell, term_cell = cells
    offering = _OFFERING_CELL.match(offering_cell)
    if offering is None:
        raise PricingPageError(
            f"{where}: the offering must look like `` `deepseek-v4-flash-1gpu` ``, "
            f"not `{offering_cell}`"
        )
    if not name:
        raise PricingPageError(f"{where}: {offering['id']}: the model name is empty")
    if not (gpus.isascii() and gpus.isdigit()):
        raise PricingPageError(f"{where}: {offering['id']}: GPUs per replica must be a number")
    price = _HOURLY_CELL.match(price_cell)
    if price is None:
        raise PricingPageError(
            f"{where}: {offering['id']}: the price must look like `$2.52`, not `{price_cell}`"
        )
    term = _TERM_CELL.match(term_cell)
    if term is None:
        raise PricingPageError(
            f"{where}: {offering['id']}: the minimum term must be `none` or `N hours`, "
            f"not `{term_cell}`"
        )
    hours = int(term["hours"]) if term["hours"] else 0
    return ReservedRow(offering["id"], name, int(gpus), price["amount"], hours)


def regenerate(page_text: str, card: RateCard, *, source: str = "docs/pricing.md") -> str:
    """The page with the text between each pair of markers replaced by its block for `card`."""
    lines = page_text.splitlines()
    begin, end = _find_markers(lines, source)
    lines = [*lines[: begin + 1], *render_block(card), *lines[end:]]
    begin, end = _find_markers(lines, source, RESERVED_BEGIN_MARKER, RESERVED_END_MARKER)
    lines = [*lines[: begin + 1], *render_reserved_block(card), *lines[end:]]
    return "\n".join(lines) + "\n"


def _check_report(page_text: str, expected_text: str, card: RateCard, source: str) -> list[str]:
    """Why the page is stale: the named drifts the gate sees, then a diff of the block."""
    # Imported here, not at the top: the gate is built on this module's parser, and the check
    # borrows the gate's comparison only to name the model and field of each difference.
    from corvex.drift_gate import compare

    report: list[str] = []
    try:
        table = parse_table(page_text, source=source)
        reserved = parse_reserved_table(page_text, source=source)
    except PricingPageError as exc:
        report.append(f"error: {exc}")
    else:
        drifts = compare(
            card,
            table.rows,
            None,
            page_version=table.version,
            page_source=source,
            page_reserved=reserved,
        )
        report.extend(str(drift) for drift in drifts)
    diff = difflib.unified_diff(
        page_text.splitlines(),
        expected_text.splitlines(),
        fromfile=f"{source} (as committed)",
        tofile=f"{source} (generated from the rate card)",
        lineterm="",
    )
    report.extend(diff)
    return report


def run(*, rate_card: Path, page: Path, check: bool) -> int:
    """`corvex docs pricing [--check]`: writes the table, or with `check` reports a stale one.

    Returns 0 when the page is (now) current, 1 when `check` finds it stale, 2 when the rate
    card or the page cannot be read.
    """
    source = str(page)
    try:
        card = load_rate_card(rate_card)
        page_text = page.read_text(encoding="utf-8")
        expected_text = regenerate(page_text, card, source=source)
    except (RateCardError, PricingPageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {source}: cannot read the pricing page: {exc.strerror}", file=sys.stderr)
        return 2
    if expected_text == page_text:
        print(f"{source}: rate tables are current (rate card {card.version})")
        return 0
    if check:
        for line in _check_report(page_text, expected_text, card, source):
            print(line)
        print(f"{source} is stale: run `corvex docs pricing` and commit the result")
        return 1
    page.write_text(expected_text, encoding="utf-8")
    print(f"{source}: rate tables written from rate card {card.version}")
    return 0
