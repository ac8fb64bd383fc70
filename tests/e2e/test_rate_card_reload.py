"""One source of prices, through the real processes: a rate-card reload on SIGHUP prices the
next request, leaves admitted requests at their old rates, refuses bad cards, stops serving
removed models, and the drift gate notices a served catalogue that left the pricing page."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from corvex import drift_gate
from corvex_core import records
from corvex_core.journal import Journal
from corvex_ops.admin import Client
from corvex_ops.stack import Stack, running_stack
from tests.conftest import ADMIN_TOKEN, FAST_ENGINE, MODEL, new_account

pytestmark = pytest.mark.e2e

RATE_CARD = Path("infrastructure/metronome/config.yaml")
PAGE = Path("docs/pricing.md")


def served_price(stack: Stack, model: str = MODEL) -> tuple[str, str]:
    with urllib.request.urlopen(stack.http_url + "/v1/models", timeout=5) as response:
        listing = json.load(response)
    for entry in listing["data"]:
        if entry["id"] == model:
            return entry["pricing"]["input"], entry["rate_card_version"]
    return "", listing["rate_card_version"]


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def health(stack: Stack) -> dict[str, Any]:
    assert stack.metrics_url is not None
    with urllib.request.urlopen(stack.metrics_url + "/health", timeout=5) as response:
        result: dict[str, Any] = json.load(response)
    return result


def edit(card: Path, old: str, new: str) -> None:
    text = card.read_text()
    assert old in text
    card.write_text(text.replace(old, new))


@pytest.fixture
def card(tmp_path: Path) -> Path:
    copy = tmp_path / "rate-card.yaml"
    shutil.copy(RATE_CARD, copy)
    return copy


@contextlib.contextmanager
def slow_stack(card: Path, data_dir: Path) -> Iterator[tuple[Stack, openai.OpenAI]]:
    """A stack on `card` whose engines take 10 ms a token, and a client of a funded key."""
    config = {"core": {"engines": {"default": {**FAST_ENGINE, "tpot_ms": 10}}}}
    with running_stack(config=config, rate_card=str(card), data_dir=data_dir) as stack:
        admin = Client(stack.grpc_address, ADMIN_TOKEN)
        account = new_account(admin, credits_cents=1000)
        admin.close()
        with openai.OpenAI(
            base_url=stack.http_url + "/v1", api_key=account.secret, max_retries=0
        ) as client:
            yield stack, client


def in_background(client: openai.OpenAI, **request: Any) -> Future[Any]:
    """A chat request running in another thread; the future holds its completion."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(
        client.chat.completions.create,
        model=MODEL,
        extra_body={"ignore_eos": True},
        **request,
    )
    pool.shutdown(wait=False)
    time.sleep(0.3)  # admitted by now, and still generating
    return future


def test_reload_prices_the_next_request_and_keeps_admitted_ones(
    tmp_path: Path, card: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with slow_stack(card, tmp_path / "data") as (stack, client):
        admitted = in_background(
            client,
            messages=[{"role": "user", "content": "old prices"}],
            max_tokens=150,
            extra_headers={"x-request-id": "admitted-before-reload"},
        )
        edit(card, 'version: "2026-11-01"', 'version: "2026-12-01"')
        edit(card, 'input_usd_per_million: "0.35"', 'input_usd_per_million: "0.40"')
        stack.core.signal(signal.SIGHUP)
        wait_for(lambda: served_price(stack) == ("0.40", "2026-12-01"))
        after = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "new prices"}],
            max_tokens=5,
            extra_body={"ignore_eos": True},
        )
        before = admitted.result(30)
        usage_before = before.usage.model_extra
        assert usage_before["rate_card_version"] == "2026-11-01"
        assert (
            Decimal(usage_before["cost_nano_usd"]).scaleb(-9)
            == (before.usage.prompt_tokens * Decimal("0.35") + 150 * Decimal("1.40")) / 10**6
        )
        assert after.usage.model_extra["rate_card_version"] == "2026-12-01"
        assert (
            Decimal(after.usage.model_extra["cost_nano_usd"]).scaleb(-9)
            == (after.usage.prompt_tokens * Decimal("0.40") + 5 * Decimal("1.40")) / 10**6
        )
        # The served catalogue no longer matches the pricing page: the gate fails and says why.
        assert drift_gate.run(rate_card=RATE_CARD, page=PAGE, served_url=stack.http_url) == 1
        report = capsys.readouterr().out
        assert "deepseek-ai/DeepSeek-V4-Flash: input price $0.40 served, $0.35" in report
    charged = {
        r.request_id: r.rate_card_version
        for r in Journal(tmp_path / "data").recover().records
        if isinstance(r, records.Charged)
    }
    assert charged["admitted-before-reload"] == "2026-11-01"


def test_invalid_card_keeps_the_old_one(tmp_path: Path, card: Path) -> None:
    with running_stack(config={"core": {}}, rate_card=str(card), data_dir=tmp_path / "d") as stack:
        edit(card, "currency: USD", "currency: USD\ndiscount: 50%")
        stack.core.signal(signal.SIGHUP)
        wait_for(lambda: health(stack)["rate_card"]["last_reload_error"] is not None)
        assert "unknown key `discount`" in health(stack)["rate_card"]["last_reload_error"]
        assert served_price(stack) == ("0.35", "2026-11-01")
        # A changed price under the same version is refused too.
        edit(card, "discount: 50%\n", "")
        edit(card, 'input_usd_per_million: "0.35"', 'input_usd_per_million: "0.30"')
        stack.core.signal(signal.SIGHUP)
        wait_for(lambda: "version" in (health(stack)["rate_card"]["last_reload_error"] or ""))
        assert served_price(stack) == ("0.35", "2026-11-01")
        assert "rate card reload refused" in stack.core.log_text()


def test_removed_model_stops_after_in_flight_requests(tmp_path: Path, card: Path) -> None:
    with slow_stack(card, tmp_path / "d") as (stack, client):
        in_flight = in_background(
            client, messages=[{"role": "user", "content": "finish me"}], max_tokens=100
        )
        text = card.read_text()
        start = text.index("  - id: deepseek-ai/DeepSeek-V4-Flash")
        card.write_text(text[:start].replace('"2026-11-01"', '"2026-11-02"'))
        stack.core.signal(signal.SIGHUP)
        wait_for(lambda: served_price(stack) == ("", "2026-11-02"))
        with pytest.raises(openai.NotFoundError) as gone:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert gone.value.code == "model_not_found"
        assert in_flight.result(30).choices[0].finish_reason == "length"
        wait_for(lambda: MODEL not in health(stack)["engines"])
