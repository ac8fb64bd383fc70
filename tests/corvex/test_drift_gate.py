"""The drift gate: the rate card, the pricing page and a served /v1/models must agree exactly."""

from __future__ import annotations

import copy
import json
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from corvex import drift_gate
from corvex.drift_gate import Drift, Field, ServedCatalogueError, compare, fetch_served
from corvex.pricing_docs import (
    page_rows,
    parse_html,
    parse_reserved_html,
    parse_reserved_table,
    parse_table,
    render_html,
    reserved_rows,
)
from corvex.ratecard import RateCard, load_rate_card

REPO = Path(__file__).resolve().parents[2]
RATE_CARD = REPO / "infrastructure" / "metronome" / "config.yaml"
PAGE = REPO / "docs" / "pricing.md"
DEEPSEEK_ID = "deepseek-ai/DeepSeek-V4-Flash"
DEEPSEEK_ROW = (
    "| DeepSeek V4 Flash | $0.35 / 1M | $1.40 / 1M | /models/deepseek-ai/DeepSeek-V4-Flash |"
)
FLASH_OFFERING = "deepseek-v4-flash-1gpu"
FLASH_RESERVED_ROW = "| `deepseek-v4-flash-1gpu` | DeepSeek V4 Flash | 1 | $2.52 | none |"

Catalogue = dict[str, Any]


def _catalogue(card: RateCard) -> Catalogue:
    """What the edge serves at /v1/models for this rate card (the shape the edge promises)."""
    return {
        "object": "list",
        "rate_card_version": card.version,
        "data": [
            {
                "id": m.id,
                "object": "model",
                "created": m.listed_unix_s,
                "owned_by": m.owned_by,
                "name": m.name,
                "card": m.card_path,
                "context_length": m.context_length,
                "engine": "simulated",
                "supports_embeddings": True,
                "pricing": {
                    "currency": "USD",
                    "unit": "per 1M tokens",
                    "input": m.input_usd_per_million,
                    "output": m.output_usd_per_million,
                },
                "reserved": [
                    {
                        "id": o.id,
                        "model": o.model,
                        "gpus_per_replica": o.gpus_per_replica,
                        "usd_per_replica_hour": o.usd_per_replica_hour,
                        "minimum_hours": o.minimum_hours,
                        "accrual": "per minute",
                    }
                    for o in card.offerings_of(m.id)
                ],
                "rate_card_version": card.version,
            }
            for m in card.models
        ],
    }


class _Served:
    """What the test server answers; tests replace it before a request."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"{}"
        # The served /pricing page: the committed rate card's table, as the edge renders it.
        card = load_rate_card(RATE_CARD)
        self.page = render_html(card.version, page_rows(card), reserved_rows(card)).encode()

    def set(self, catalogue: Catalogue) -> None:
        self.body = json.dumps(catalogue).encode()


@pytest.fixture
def card() -> RateCard:
    return load_rate_card(RATE_CARD)


@pytest.fixture
def server() -> Iterator[tuple[str, _Served]]:
    """A real HTTP server on 127.0.0.1, port 0, serving `/v1/models` from a _Served."""
    served = _Served()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/pricing":
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(served.page)))
                self.end_headers()
                self.wfile.write(served.page)
                return
            if self.path != "/v1/models":
                self.send_error(404)
                return
            self.send_response(served.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(served.body)))
            self.end_headers()
            self.wfile.write(served.body)

        def log_message(self, format: str, *args: Any) -> None:
            # Keep the test output to what the test asserts.
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def page(tmp_path: Path) -> Path:
    copy_path = tmp_path / "pricing.md"
    shutil.copyfile(PAGE, copy_path)
    return copy_path


def _page_drifts(card: RateCard, page_text: str) -> list[tuple[str, str, Field]]:
    table = parse_table(page_text, source="page.md")
    reserved = parse_reserved_table(page_text, source="page.md")
    drifts = compare(
        card,
        table.rows,
        None,
        page_version=table.version,
        page_source="page.md",
        page_reserved=reserved,
    )
    return [(d.source, d.model, d.field) for d in drifts]


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"expected exactly one `{old}`"
    return text.replace(old, new)


def test_committed_page_rate_card_and_catalogue_agree(
    card: RateCard, server: tuple[str, _Served], capsys: pytest.CaptureFixture[str]
) -> None:
    url, served = server
    served.set(_catalogue(card))

    assert drift_gate.run(rate_card=RATE_CARD, page=PAGE, served_url=url) == 0

    out = capsys.readouterr().out
    assert "drift:" not in out
    assert out.startswith("drift gate OK: rate card 2026-11-01 (4 models, 4 reserved offerings)")
    assert f"{url}/v1/models" in out


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(
            DEEPSEEK_ROW,
            DEEPSEEK_ROW.replace("$0.35", "$0.36"),
            [("page.md", "DeepSeek V4 Flash", Field.INPUT_PRICE)],
            id="input-price",
        ),
        pytest.param(
            DEEPSEEK_ROW,
            DEEPSEEK_ROW.replace("$1.40", "$1.04"),
            [("page.md", "DeepSeek V4 Flash", Field.OUTPUT_PRICE)],
            id="output-price",
        ),
        pytest.param(
            DEEPSEEK_ROW + "\n",
            "",
            [("page.md", "DeepSeek V4 Flash", Field.MISSING)],
            id="missing-model",
        ),
        pytest.param(
            DEEPSEEK_ROW,
            DEEPSEEK_ROW + "\n| Llama 9 | $0.10 / 1M | $0.20 / 1M | /models/meta/Llama-9 |",
            [("page.md", "Llama 9", Field.EXTRA)],
            id="extra-model",
        ),
        pytest.param(
            DEEPSEEK_ROW,
            DEEPSEEK_ROW.replace("| DeepSeek V4 Flash |", "| DeepSeek V4 Fast |"),
            [("page.md", "DeepSeek V4 Flash", Field.NAME)],
            id="name",
        ),
        pytest.param(
            DEEPSEEK_ROW,
            DEEPSEEK_ROW.replace("DeepSeek-V4-Flash |", "DeepSeek-V4 |"),
            [("page.md", "DeepSeek V4 Flash", Field.CARD)],
            id="card",
        ),
        pytest.param(
            "Rate card version `2026-11-01`; prices are in USD per 1M",
            "Rate card version `2026-10-01`; prices are in USD per 1M",
            [("page.md", "", Field.VERSION)],
            id="version",
        ),
        pytest.param(
            FLASH_RESERVED_ROW,
            FLASH_RESERVED_ROW.replace("$2.52", "$2.49"),
            [("page.md", FLASH_OFFERING, Field.HOURLY_PRICE)],
            id="reserved-price",
        ),
        pytest.param(
            FLASH_RESERVED_ROW,
            FLASH_RESERVED_ROW.replace("| 1 |", "| 2 |"),
            [("page.md", FLASH_OFFERING, Field.GPUS)],
            id="reserved-gpus",
        ),
        pytest.param(
            FLASH_RESERVED_ROW,
            FLASH_RESERVED_ROW.replace("none", "2 hours"),
            [("page.md", FLASH_OFFERING, Field.MINIMUM_TERM)],
            id="reserved-term",
        ),
        pytest.param(
            FLASH_RESERVED_ROW,
            FLASH_RESERVED_ROW.replace("| DeepSeek V4 Flash |", "| DeepSeek |"),
            [("page.md", FLASH_OFFERING, Field.MODEL)],
            id="reserved-model",
        ),
        pytest.param(
            FLASH_RESERVED_ROW + "\n",
            "",
            [("page.md", FLASH_OFFERING, Field.MISSING)],
            id="reserved-missing",
        ),
        pytest.param(
            FLASH_RESERVED_ROW,
            FLASH_RESERVED_ROW + "\n| `flash-8gpu` | DeepSeek V4 Flash | 8 | $20.16 | none |",
            [("page.md", "flash-8gpu", Field.EXTRA)],
            id="reserved-extra",
        ),
        pytest.param(
            "Rate card version `2026-11-01`; prices are in USD per replica-hour",
            "Rate card version `2026-10-01`; prices are in USD per replica-hour",
            [("page.md", "", Field.VERSION)],
            id="reserved-version",
        ),
    ],
)
def test_gate_names_each_kind_of_page_drift(
    card: RateCard, old: str, new: str, expected: list[tuple[str, str, Field]]
) -> None:
    text = _replace_once(PAGE.read_text(encoding="utf-8"), old, new)
    assert _page_drifts(card, text) == expected


def test_prices_compare_as_numbers_not_text(card: RateCard) -> None:
    row = "| GLM 5.1 FP8 | $0.50 / 1M | $2.00 / 1M |"
    text = _replace_once(
        PAGE.read_text(encoding="utf-8"), row, "| GLM 5.1 FP8 | $0.5 / 1M | $2 / 1M |"
    )
    assert _page_drifts(card, text) == []


def test_drift_line_names_page_model_and_both_prices(
    page: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = page.read_text(encoding="utf-8")
    page.write_text(_replace_once(text, DEEPSEEK_ROW, DEEPSEEK_ROW.replace("$0.35", "$0.36")))

    assert drift_gate.run(rate_card=RATE_CARD, page=page, served_url=None) == 1

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        f"drift: {page}: DeepSeek V4 Flash: input price $0.36 on the page, $0.35 on the rate card"
    )
    assert lines[1].startswith("drift gate FAILED: 1 difference")


def _set_pricing(catalogue: Catalogue, model_id: str, key: str, value: object) -> None:
    entry = next(e for e in catalogue["data"] if e["id"] == model_id)
    entry["pricing"][key] = value


def _drop(catalogue: Catalogue, model_id: str) -> None:
    catalogue["data"] = [e for e in catalogue["data"] if e["id"] != model_id]


def _add_extra(catalogue: Catalogue) -> None:
    extra = copy.deepcopy(catalogue["data"][0])
    extra["id"] = "meta/Llama-9"
    catalogue["data"].append(extra)


def _set_entry(catalogue: Catalogue, model_id: str, key: str, value: object) -> None:
    next(e for e in catalogue["data"] if e["id"] == model_id)[key] = value


def _set_offering(catalogue: Catalogue, key: str, value: object) -> None:
    entry = next(e for e in catalogue["data"] if e["id"] == DEEPSEEK_ID)
    entry["reserved"][0][key] = value


def _add_endpoint(catalogue: Catalogue) -> None:
    """A workspace's own endpoint, as the edge lists it for that workspace's keys."""
    endpoint = copy.deepcopy(catalogue["data"][0])
    endpoint.update(id="acme-bb343abb/prod", reserved=[], reserved_endpoint={"id": "ep_1"})
    catalogue["data"].append(endpoint)


Mutation = Callable[[Catalogue], None]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        pytest.param(
            lambda c: _set_pricing(c, DEEPSEEK_ID, "input", "0.36"),
            [(DEEPSEEK_ID, Field.INPUT_PRICE)],
            id="input-price",
        ),
        pytest.param(
            lambda c: _set_pricing(c, DEEPSEEK_ID, "output", "1.41"),
            [(DEEPSEEK_ID, Field.OUTPUT_PRICE)],
            id="output-price",
        ),
        pytest.param(
            lambda c: _set_pricing(c, DEEPSEEK_ID, "input", 0.35),
            [(DEEPSEEK_ID, Field.INPUT_PRICE)],
            id="price-as-json-number",
        ),
        pytest.param(lambda c: _drop(c, DEEPSEEK_ID), [(DEEPSEEK_ID, Field.MISSING)], id="missing"),
        pytest.param(_add_extra, [("meta/Llama-9", Field.EXTRA)], id="extra"),
        pytest.param(
            lambda c: c.update(rate_card_version="2026-10-01"),
            [("", Field.VERSION)],
            id="catalogue-version",
        ),
        pytest.param(
            lambda c: _set_entry(c, DEEPSEEK_ID, "rate_card_version", "2026-10-01"),
            [(DEEPSEEK_ID, Field.VERSION)],
            id="model-version",
        ),
        pytest.param(
            lambda c: _set_entry(c, DEEPSEEK_ID, "name", "DeepSeek V4"),
            [(DEEPSEEK_ID, Field.NAME)],
            id="name",
        ),
        pytest.param(
            lambda c: _set_entry(c, DEEPSEEK_ID, "card", "/models/deepseek-ai/V4"),
            [(DEEPSEEK_ID, Field.CARD)],
            id="card",
        ),
        pytest.param(
            lambda c: _set_pricing(c, DEEPSEEK_ID, "unit", "per 1K tokens"),
            [(DEEPSEEK_ID, Field.UNIT)],
            id="unit",
        ),
        pytest.param(
            lambda c: _set_pricing(c, DEEPSEEK_ID, "currency", "EUR"),
            [(DEEPSEEK_ID, Field.CURRENCY)],
            id="currency",
        ),
        pytest.param(
            lambda c: _set_entry(c, DEEPSEEK_ID, "pricing", None),
            [(DEEPSEEK_ID, Field.MALFORMED)],
            id="no-pricing",
        ),
        pytest.param(
            lambda c: _set_pricing(c, DEEPSEEK_ID, "input", "0.350"), [], id="0.350-agrees"
        ),
        pytest.param(
            lambda c: _set_offering(c, "usd_per_replica_hour", "2.49"),
            [(FLASH_OFFERING, Field.HOURLY_PRICE)],
            id="reserved-price",
        ),
        pytest.param(
            lambda c: _set_offering(c, "usd_per_replica_hour", 2.52),
            [(FLASH_OFFERING, Field.HOURLY_PRICE)],
            id="reserved-price-as-json-number",
        ),
        pytest.param(
            lambda c: _set_offering(c, "gpus_per_replica", 2),
            [(FLASH_OFFERING, Field.GPUS)],
            id="reserved-gpus",
        ),
        pytest.param(
            lambda c: _set_offering(c, "minimum_hours", 1),
            [(FLASH_OFFERING, Field.MINIMUM_TERM)],
            id="reserved-term",
        ),
        pytest.param(
            lambda c: _set_offering(c, "id", "flash-8gpu"),
            [(FLASH_OFFERING, Field.MISSING), ("flash-8gpu", Field.EXTRA)],
            id="reserved-renamed",
        ),
        pytest.param(
            lambda c: _set_entry(c, DEEPSEEK_ID, "reserved", None),
            [(DEEPSEEK_ID, Field.MALFORMED)],
            id="reserved-not-a-list",
        ),
        pytest.param(_add_endpoint, [], id="a-workspace-endpoint-is-not-a-card-model"),
    ],
)
def test_gate_names_each_kind_of_served_drift(
    card: RateCard,
    server: tuple[str, _Served],
    mutate: Mutation,
    expected: list[tuple[str, Field]],
) -> None:
    url, served = server
    catalogue = _catalogue(card)
    mutate(catalogue)
    served.set(catalogue)

    page_rows = parse_table(PAGE.read_text(encoding="utf-8")).rows
    drifts = compare(card, page_rows, fetch_served(url), served_source="served")

    assert [(d.source, d.model, d.field) for d in drifts] == [("served", *e) for e in expected]


def test_run_reports_a_served_price_drift(
    card: RateCard, server: tuple[str, _Served], capsys: pytest.CaptureFixture[str]
) -> None:
    url, served = server
    catalogue = _catalogue(card)
    _set_pricing(catalogue, DEEPSEEK_ID, "input", "0.34")
    served.set(catalogue)

    assert drift_gate.run(rate_card=RATE_CARD, page=PAGE, served_url=url) == 1

    assert (
        f"drift: {url}/v1/models: {DEEPSEEK_ID}: input price $0.34 served, $0.35 on the rate card"
    ) in capsys.readouterr().out.splitlines()


def test_run_reports_a_drift_of_the_served_pricing_page(
    card: RateCard, server: tuple[str, _Served], capsys: pytest.CaptureFixture[str]
) -> None:
    url, served = server
    served.set(_catalogue(card))
    served.page = served.page.replace(b"$0.35 / 1M", b"$0.30 / 1M")

    assert drift_gate.run(rate_card=RATE_CARD, page=PAGE, served_url=url) == 1

    assert (
        f"drift: {url}/pricing: DeepSeek V4 Flash: input price $0.30 on the page, "
        "$0.35 on the rate card"
    ) in capsys.readouterr().out.splitlines()


def test_the_served_page_reads_back_as_the_markdown_tables(card: RateCard) -> None:
    page = render_html(card.version, page_rows(card), reserved_rows(card))
    committed = PAGE.read_text(encoding="utf-8")
    assert parse_html(page) == parse_table(committed)
    assert parse_reserved_html(page) == parse_reserved_table(committed)


def test_run_reports_a_reserved_drift_of_the_served_page(
    card: RateCard, server: tuple[str, _Served], capsys: pytest.CaptureFixture[str]
) -> None:
    url, served = server
    served.set(_catalogue(card))
    served.page = served.page.replace(b"<td>$2.52</td>", b"<td>$2.50</td>")

    assert drift_gate.run(rate_card=RATE_CARD, page=PAGE, served_url=url) == 1

    out = capsys.readouterr().out
    assert f"drift: {url}/pricing: deepseek-v4-flash-1gpu:" in out and "$2.50" in out


def test_unreachable_catalogue_is_an_error_not_a_pass(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A port that was free a moment ago: nothing listens there.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"

    with pytest.raises(ServedCatalogueError, match="cannot reach"):
        fetch_served(url)
    assert drift_gate.run(rate_card=RATE_CARD, page=PAGE, served_url=url) == 2
    assert "cannot reach" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("status", "body", "words"),
    [
        (500, b'{"error": {}}', "HTTP 500"),
        (200, b"<html>not json</html>", "did not answer JSON"),
        (200, b"[]", "not an object"),
    ],
)
def test_a_bad_answer_is_an_error(
    server: tuple[str, _Served], status: int, body: bytes, words: str
) -> None:
    url, served = server
    served.status, served.body = status, body
    with pytest.raises(ServedCatalogueError, match=words):
        fetch_served(url)


def test_drift_reads_as_one_line() -> None:
    drift = Drift("served", "", Field.VERSION, "rate card version x served, y on the rate card")
    assert str(drift) == "drift: served: rate card version x served, y on the rate card"
