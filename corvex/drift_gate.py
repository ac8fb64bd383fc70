"""The tier-0 drift gate: the rate card, the pricing page's tables, the served /v1/models and the
served /pricing page agree.

It owns the three-way comparison (each difference named by source, model or reserved offering,
and field; per-token prices and reserved offerings alike) and
reading the served catalogue over HTTP. It only reports: it never edits the page or the rate
card, and it never decides which price is right (the rate card always is).
"""

from __future__ import annotations

import json
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any

import msgspec

from corvex.pricing_docs import (
    PageRow,
    PricingPageError,
    ReservedRow,
    ReservedTable,
    parse_html,
    parse_reserved_html,
    parse_reserved_table,
    parse_table,
)
from corvex.ratecard import ModelRate, RateCard, RateCardError, ReservedOffering, load_rate_card

# The catalogue is a few kilobytes; anything near this is not our edge answering.
_MAX_BODY_BYTES = 4 * 1024 * 1024
_FETCH_TIMEOUT_S = 5.0
_PRICE_TEXT = re.compile(r"^\d+(?:\.\d+)?$")
SERVED_UNIT = "per 1M tokens"
# How a drift line says where the differing value was seen.
_PAGE = "on the page"
_SERVED = "served"


class Field(StrEnum):
    """What differs. The value is how a drift line names it."""

    INPUT_PRICE = "input price"
    OUTPUT_PRICE = "output price"
    NAME = "name"
    CARD = "card"
    CURRENCY = "currency"
    UNIT = "price unit"
    VERSION = "rate card version"
    MISSING = "missing"
    EXTRA = "extra"
    MALFORMED = "malformed"
    MODEL = "model"
    GPUS = "GPUs per replica"
    HOURLY_PRICE = "price per replica-hour"
    MINIMUM_TERM = "minimum term"


class Drift(msgspec.Struct, frozen=True):
    """One disagreement with the rate card, in one source, about one model (or the whole list)."""

    source: str
    # The display name on the page side, the model id on the served side, the offering id
    # for a reserved offering, "" for the list.
    model: str
    field: Field
    detail: str

    def __str__(self) -> str:
        subject = f"{self.model}: " if self.model else ""
        return f"drift: {self.source}: {subject}{self.detail}"


class ServedCatalogueError(Exception):
    """The served /v1/models could not be fetched or is not a JSON object."""


def compare(
    rate_card: RateCard,
    page_rows: list[PageRow],
    served: dict[str, Any] | None,
    *,
    page_version: str | None = None,
    page_source: str = "docs/pricing.md",
    served_source: str = "/v1/models",
    page_reserved: ReservedTable | None = None,
) -> list[Drift]:
    """Every way the page's rows (and version), its reserved table (when given) and the served
    catalogue differ from the card."""
    drifts = []
    if page_version is not None and page_version != rate_card.version:
        version = rate_card.version
        drifts.append(_mismatch(page_source, _PAGE, "", Field.VERSION, page_version, version))
    drifts.extend(_page_drifts(rate_card, page_rows, page_source))
    if page_reserved is not None:
        drifts.extend(_page_reserved_drifts(rate_card, page_reserved, page_source))
    if served is not None:
        drifts.extend(_served_drifts(rate_card, served, served_source))
    return drifts


def _page_reserved_drifts(card: RateCard, table: ReservedTable, source: str) -> list[Drift]:
    drifts = []
    if table.version != card.version:
        where = f"{_PAGE} (reserved table)"
        drifts.append(_mismatch(source, where, "", Field.VERSION, table.version, card.version))
    rows = {row.offering: row for row in table.rows}
    for offering in card.reserved:
        row = rows.pop(offering.id, None)
        if row is None:
            detail = "on the rate card but missing from the page's reserved table"
            drifts.append(Drift(source, offering.id, Field.MISSING, detail))
        else:
            drifts.extend(_reserved_row_drifts(card, offering, row, source))
    for offering_id in rows:
        detail = "on the page's reserved table but not on the rate card"
        drifts.append(Drift(source, offering_id, Field.EXTRA, detail))
    return drifts


def _reserved_row_drifts(
    card: RateCard, offering: ReservedOffering, row: ReservedRow, source: str
) -> Iterator[Drift]:
    name = card.by_id[offering.model].name
    if row.model_name != name:
        yield _mismatch(source, _PAGE, offering.id, Field.MODEL, f'"{row.model_name}"', f'"{name}"')
    if row.gpus_per_replica != offering.gpus_per_replica:
        found, expected = str(row.gpus_per_replica), str(offering.gpus_per_replica)
        yield _mismatch(source, _PAGE, offering.id, Field.GPUS, found, expected)
    if not _same_price(row.usd_per_replica_hour, offering.usd_per_replica_hour):
        found, expected = f"${row.usd_per_replica_hour}", f"${offering.usd_per_replica_hour}"
        yield _mismatch(source, _PAGE, offering.id, Field.HOURLY_PRICE, found, expected)
    if row.minimum_hours != offering.minimum_hours:
        found, expected = f"{row.minimum_hours} h", f"{offering.minimum_hours} h"
        yield _mismatch(source, _PAGE, offering.id, Field.MINIMUM_TERM, found, expected)


def _mismatch(
    source: str, where: str, model: str, field: Field, found: str, expected: str
) -> Drift:
    return Drift(source, model, field, f"{field} {found} {where}, {expected} on the rate card")


def _same_price(found: str, expected: str) -> bool:
    # Compared as numbers so "0.5" and "0.50" agree; both sides are checked decimal text.
    return Decimal(found) == Decimal(expected)


def _match_rows(card: RateCard, rows: list[PageRow]) -> tuple[dict[str, PageRow], list[PageRow]]:
    """Pairs each model with its page row, by card path first and then by name, so that a row
    whose name or card alone changed is reported as that change, not as missing plus extra."""
    passes: tuple[Callable[[ModelRate, PageRow], bool], ...] = (
        lambda m, r: r.card_path == m.card_path,
        lambda m, r: r.name == m.name,
    )
    unmatched = list(rows)
    matched: dict[str, PageRow] = {}
    for same in passes:
        for model in card.models:
            if model.id in matched:
                continue
            row = next((r for r in unmatched if same(model, r)), None)
            if row is not None:
                matched[model.id] = row
                unmatched.remove(row)
    return matched, unmatched


def _page_drifts(card: RateCard, rows: list[PageRow], source: str) -> list[Drift]:
    matched, extra = _match_rows(card, rows)
    drifts: list[Drift] = []
    for model in card.models:
        row = matched.get(model.id)
        if row is None:
            detail = "on the rate card but missing from the page"
            drifts.append(Drift(source, model.name, Field.MISSING, detail))
        else:
            drifts.extend(_row_drifts(model, row, source))
    for row in extra:
        detail = f"on the page ({row.card_path}) but not on the rate card"
        drifts.append(Drift(source, row.name, Field.EXTRA, detail))
    return drifts


def _row_drifts(model: ModelRate, row: PageRow, source: str) -> Iterator[Drift]:
    prices = (
        (Field.INPUT_PRICE, row.input_usd_per_million, model.input_usd_per_million),
        (Field.OUTPUT_PRICE, row.output_usd_per_million, model.output_usd_per_million),
    )
    for field, found, expected in prices:
        if not _same_price(found, expected):
            yield _mismatch(source, _PAGE, model.name, field, f"${found}", f"${expected}")
    if row.name != model.name:
        names = f'"{row.name}"', f'"{model.name}"'
        yield _mismatch(source, _PAGE, model.name, Field.NAME, *names)
    if row.card_path != model.card_path:
        cards = row.card_path, model.card_path
        yield _mismatch(source, _PAGE, model.name, Field.CARD, *cards)


def _served_drifts(card: RateCard, served: dict[str, Any], source: str) -> list[Drift]:
    data = served.get("data")
    if not isinstance(data, list):
        return [Drift(source, "", Field.MALFORMED, "the response has no `data` list")]
    version_check = ((Field.VERSION, served, "rate_card_version", card.version),)
    drifts = list(_text_drifts(source, "", version_check))
    entries: dict[str, dict[str, Any]] = {}
    for entry in data:
        if isinstance(entry, dict) and "reserved_endpoint" in entry:
            continue  # a workspace's own endpoint (listed for its keys), not a card model
        model_id = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(model_id, str):
            detail = f"an entry without a string `id`: {json.dumps(entry)[:200]}"
            drifts.append(Drift(source, "", Field.MALFORMED, detail))
        elif model_id in entries:
            drifts.append(Drift(source, model_id, Field.MALFORMED, "listed twice"))
        else:
            entries[model_id] = entry
    for model in card.models:
        found = entries.pop(model.id, None)
        if found is None:
            detail = "on the rate card but not served"
            drifts.append(Drift(source, model.id, Field.MISSING, detail))
        else:
            drifts.extend(_served_model_drifts(card, model, found, source))
    for model_id in entries:
        drifts.append(Drift(source, model_id, Field.EXTRA, "served but not on the rate card"))
    return drifts


def _served_model_drifts(
    card: RateCard, model: ModelRate, entry: dict[str, Any], source: str
) -> Iterator[Drift]:
    pricing = entry.get("pricing")
    if not isinstance(pricing, dict):
        yield Drift(source, model.id, Field.MALFORMED, "the entry has no `pricing` object")
        return
    yield from _text_drifts(
        source,
        model.id,
        (
            (Field.NAME, entry, "name", model.name),
            (Field.CARD, entry, "card", model.card_path),
            (Field.VERSION, entry, "rate_card_version", card.version),
            (Field.CURRENCY, pricing, "currency", card.currency),
            (Field.UNIT, pricing, "unit", SERVED_UNIT),
        ),
    )
    prices = (
        (Field.INPUT_PRICE, pricing.get("input"), model.input_usd_per_million),
        (Field.OUTPUT_PRICE, pricing.get("output"), model.output_usd_per_million),
    )
    for field, found, expected in prices:
        # Prices travel as decimal text: a JSON number would already have passed through a float.
        if not isinstance(found, str) or _PRICE_TEXT.match(found) is None:
            detail = f"{field} served as {json.dumps(found)}; it must be a decimal string"
            yield Drift(source, model.id, field, detail)
        elif not _same_price(found, expected):
            yield _mismatch(source, _SERVED, model.id, field, f"${found}", f"${expected}")
    yield from _served_offering_drifts(card, model, entry.get("reserved"), source)


def _served_offering_drifts(
    card: RateCard, model: ModelRate, served: Any, source: str
) -> Iterator[Drift]:
    """A served entry's `reserved` list against the card's offerings of that model."""
    if not isinstance(served, list) or not all(isinstance(o, dict) for o in served):
        detail = "the entry has no `reserved` list of offerings"
        yield Drift(source, model.id, Field.MALFORMED, detail)
        return
    by_id = {o.get("id"): o for o in served}
    for offering in card.offerings_of(model.id):
        found = by_id.pop(offering.id, None)
        if found is None:
            detail = f"reserved offering {offering.id} is on the rate card but not served"
            yield Drift(source, offering.id, Field.MISSING, detail)
            continue
        yield from _text_drifts(
            source,
            offering.id,
            ((Field.MODEL, found, "model", offering.model),),
        )
        for field, key, number in (
            (Field.GPUS, "gpus_per_replica", offering.gpus_per_replica),
            (Field.MINIMUM_TERM, "minimum_hours", offering.minimum_hours),
        ):
            value = found.get(key)
            if value != number or isinstance(value, bool):
                shown = json.dumps(value)
                yield _mismatch(source, _SERVED, offering.id, field, shown, str(number))
        price = found.get("usd_per_replica_hour")
        if not isinstance(price, str) or _PRICE_TEXT.match(price) is None:
            detail = (
                f"{Field.HOURLY_PRICE} served as {json.dumps(price)}; it must be a decimal string"
            )
            yield Drift(source, offering.id, Field.HOURLY_PRICE, detail)
        elif not _same_price(price, offering.usd_per_replica_hour):
            found_text, expected = f"${price}", f"${offering.usd_per_replica_hour}"
            yield _mismatch(source, _SERVED, offering.id, Field.HOURLY_PRICE, found_text, expected)
    for extra in by_id:
        detail = f"reserved offering {json.dumps(extra)} is served but not on the rate card"
        yield Drift(source, str(extra), Field.EXTRA, detail)


def _text_drifts(
    source: str, model: str, checks: tuple[tuple[Field, dict[str, Any], str, str], ...]
) -> Iterator[Drift]:
    """Drifts for served fields that must equal the rate card's text exactly."""
    for field, obj, key, expected in checks:
        found = obj.get(key)
        if found is None:
            detail = f"{field} is not served (`{key}`); the rate card says {expected}"
            yield Drift(source, model, field, detail)
        elif found != expected:
            yield _mismatch(source, _SERVED, model, field, json.dumps(found), json.dumps(expected))


def models_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/v1/models"


def pricing_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/pricing"


def _get(url: str, accept: str, timeout_s: float) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body: bytes = response.read(_MAX_BODY_BYTES + 1)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise ServedCatalogueError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServedCatalogueError(f"cannot reach {url}: {reason}") from None
    if len(body) > _MAX_BODY_BYTES:
        raise ServedCatalogueError(f"{url} answered more than {_MAX_BODY_BYTES} bytes")
    return body


def fetch_served_page(base_url: str, *, timeout_s: float = _FETCH_TIMEOUT_S) -> str:
    """GETs the served pricing page `{base_url}/pricing` (HTML)."""
    url = pricing_url(base_url)
    body = _get(url, "text/html", timeout_s)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise ServedCatalogueError(f"{url} did not answer UTF-8 text") from None


def fetch_served(base_url: str, *, timeout_s: float = _FETCH_TIMEOUT_S) -> dict[str, Any]:
    """GETs `{base_url}/v1/models` and returns the decoded JSON object."""
    url = models_url(base_url)
    body = _get(url, "application/json", timeout_s)
    try:
        decoded = json.loads(body)
    except ValueError as exc:
        raise ServedCatalogueError(f"{url} did not answer JSON: {exc}") from None
    if not isinstance(decoded, dict):
        raise ServedCatalogueError(f"{url} answered JSON that is not an object")
    return decoded


def run(*, rate_card: Path, page: Path, served_url: str | None) -> int:
    """`corvex drift-gate [--served-url URL]`: prints each drift; 0 clean, 1 drift, 2 error."""
    page_source = str(page)
    served_source = models_url(served_url) if served_url is not None else "/v1/models"
    served_page = served_reserved = None
    try:
        card = load_rate_card(rate_card)
        page_text = page.read_text(encoding="utf-8")
        table = parse_table(page_text, source=page_source)
        reserved = parse_reserved_table(page_text, source=page_source)
        served = fetch_served(served_url) if served_url is not None else None
        if served_url is not None:
            page_url = pricing_url(served_url)
            served_html = fetch_served_page(served_url)
            served_page = parse_html(served_html, source=page_url)
            served_reserved = parse_reserved_html(served_html, source=page_url)
    except (RateCardError, PricingPageError, ServedCatalogueError) as exc:
        print(f"drift gate: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"drift gate: error: {page_source}: {exc.strerror}", file=sys.stderr)
        return 2
    drifts = compare(
        card,
        table.rows,
        served,
        page_version=table.version,
        page_source=page_source,
        served_source=served_source,
        page_reserved=reserved,
    )
    if served_page is not None:
        drifts += compare(
            card,
            served_page.rows,
            None,
            page_version=served_page.version,
            page_source=pricing_url(served_url or ""),
            page_reserved=served_reserved,
        )
    for drift in drifts:
        print(drift)
    if drifts:
        print(f"drift gate FAILED: {len(drifts)} difference(s) from rate card {card.version}")
        return 1
    served_note = (
        f", {served_source} and {pricing_url(served_url or '')}"
        if served is not None
        else " (served catalogue and page not checked)"
    )
    print(
        f"drift gate OK: rate card {card.version} ({len(card.models)} models, "
        f"{len(card.reserved)} reserved offerings) matches "
        f"{page_source}{served_note}"
    )
    return 0
