"""The customer's journey in a real browser: Debian's Chromium driven by Playwright, against the
real core and edge processes, with the official OpenAI SDK beside it.

Sign up, claim the starter credits (a second claim is refused), buy credits through the
checkout (a double submit credits once), create a key and call the API with it, chat in the
playground (streamed, each turn's cost shown, the balance updated), find the request in usage
and its chart, download the invoice PDF and read its text, set a cap below the month's spend
and see the playground's 402, revoke the key. Screenshots of every page are taken on the way
(into $CORVEX_SCREENSHOTS when set: `make screenshots` writes docs/screenshots). The same
journey runs against a cluster too (`corvex serve --cores 2`: two cores sharing a PostgreSQL
ledger, the edge routing across them), unchanged.

Chromium cannot be downloaded here (`playwright install` needs the internet), so the test uses
/usr/bin/chromium, which `make test` installs with apt-get. If it is missing the test fails and
says so: it never skips.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from pypdf import PdfReader

from corvex_core.pg.server import PgServer
from corvex_ops.stack import Cluster, Stack, running_cluster, running_stack
from tests.conftest import STACK_CONFIG
from tests.e2e.cluster import cluster_config, cluster_database

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORD = "a long enough password"
MODEL = "deepseek-ai/DeepSeek-V4-Flash"
# Tokens take a few milliseconds each, so a streamed answer arrives in several chunks.
STREAMING_ENGINE = {"backend": "simulated", "ttft_ms": 5, "tpot_ms": 4}


def chromium_executable() -> str:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's chromium package "
            "(`make browser`, which `make test` runs, installs it with apt-get as root)."
        )
    return str(CHROMIUM)


@pytest.fixture(scope="module")
def web_stack() -> Iterator[Stack]:
    config = {"core": {**STACK_CONFIG["core"], "engines": {"default": STREAMING_ENGINE}}}
    with running_stack(config=config) as running:
        yield running


@pytest.fixture(scope="module")
def web_cluster(pg_server: PgServer) -> Iterator[Cluster]:
    config = cluster_config()
    config["core"]["engines"] = {"default": STREAMING_ENGINE}
    with cluster_database(pg_server) as dsn, running_cluster(dsn=dsn, config=config) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


class Shots:
    """Screenshots of each page: into $CORVEX_SCREENSHOTS (the docs) or the test's tmp dir."""

    def __init__(self, tmp_path: Path, *, docs: bool = True) -> None:
        wanted = os.environ.get("CORVEX_SCREENSHOTS") if docs else None
        self.dir = Path(wanted or tmp_path)
        self.dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, page: Any, name: str) -> None:
        path = self.dir / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 1000


def money(text: str) -> str:
    found = re.search(r"\$(\d+\.\d+)", text)
    assert found is not None, text
    return found.group(1)


def test_customer_journey_on_a_cluster(web_cluster: Cluster, browser: Any, tmp_path: Path) -> None:
    """The README's web-app tour against two cores: the dashboard's calls go to one core, the
    playground's and the SDK's are routed across both, and every page agrees. (First in the
    module: its database is made before Playwright's event loop runs in this thread.)"""
    journey(web_cluster.http_url, browser, Shots(tmp_path, docs=False))


def test_customer_journey(web_stack: Stack, browser: Any, tmp_path: Path) -> None:
    journey(web_stack.http_url, browser, Shots(tmp_path))


def journey(base: str, browser: Any, shot: Shots) -> None:
    from playwright.sync_api import expect

    context = browser.new_context(
        base_url=base, viewport={"width": 1200, "height": 800}, accept_downloads=True
    )
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    page = context.new_page()
    page.set_default_timeout(20_000)

    # Public pages: the generated pricing table and a model card from it.
    page.goto("/pricing")
    assert page.locator("#rate-table tbody tr").count() == 4
    shot(page, "pricing")
    page.click("#rate-table a[href='/models/deepseek-ai/DeepSeek-V4-Flash']")
    assert page.url.endswith("/models/deepseek-ai/DeepSeek-V4-Flash")
    assert "$0.35 / 1M tokens" in page.inner_text("#model-facts")
    assert "131,072 tokens" in page.inner_text("#model-facts")
    shot(page, "model-card")

    # Sign up: a workspace with nothing in it until the claim.
    page.goto("/dashboard/signup")
    page.fill("input[name=email]", "ada@example.com")
    page.fill("input[name=password]", PASSWORD)
    page.fill("input[name=confirm]", PASSWORD)
    page.fill("input[name=workspace]", "Analytical Engines")
    shot(page, "signup")
    page.click("button[type=submit]")
    page.wait_for_url("**/dashboard/")
    assert page.inner_text("#balance") == "$0.00"

    # The claim, twice: from this tab and from a second one opened before it.
    second = context.new_page()
    second.goto("/dashboard/")
    page.click("#claim-starter")
    assert "$5.00 of starter credits added" in page.inner_text(".flash")
    assert page.inner_text("#balance") == "$5.00"
    second.click("#claim-starter")
    refusal = second.inner_text(".flash.error")
    assert "claimed already" in refusal and "once per account" in refusal
    second.close()
    assert page.inner_text("#balance") == "$5.00"

    # Buy $12.34 through the (simulated) checkout; approving twice credits once.
    page.goto("/dashboard/credits")
    page.fill("#buy-form input[name=amount]", "12.34")
    page.click("#buy-form button")
    page.wait_for_url("**/dashboard/credits/checkout/*")
    checkout_url = page.url
    assert page.inner_text("#checkout-amount") == "$12.34"
    shot(page, "checkout")
    page.click("#approve")
    page.wait_for_url("**/dashboard/credits")
    assert "$12.34 added to your balance" in page.inner_text(".flash")
    page.goto(checkout_url)
    page.click("#approve")
    assert "credited already" in page.inner_text(".flash")
    assert page.inner_text("#balance") == "$17.34"
    assert page.locator("#invoices tbody tr").count() == 2

    # A key: its secret shown once, copied with the button, used with the OpenAI SDK.
    page.goto("/dashboard/keys")
    page.fill("#create-key input[name=name]", "sdk")
    page.fill("#create-key input[name=rpm]", "600")
    page.click("#create-key button")
    secret = page.inner_text("#new-secret")
    assert secret.startswith("corvex-")
    page.click("#copy-secret")
    # The clipboard answers asynchronously: wait for the button to say so.
    expect(page.locator("#copy-secret")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    shot(page, "keys")
    page.reload()
    assert secret not in page.content()

    client = openai.OpenAI(base_url=base + "/v1", api_key=secret, max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
    )
    assert reply.usage is not None
    sdk_request_id = reply.id.removeprefix("chatcmpl-")
    page.goto("/dashboard/keys")
    sdk_row = page.locator("#keys tr", has_text="sdk")
    assert "never" not in sdk_row.inner_text()  # last used

    # The playground streams, shows the turn's tokens and exact cost, updates the balance.
    page.goto("/dashboard/playground")
    before = money(page.inner_text("#balance"))
    page.select_option("#model", MODEL)
    page.fill("#system", "You are terse.")
    page.fill("#max-tokens", "24")
    page.fill("#prompt", "Tell me about prepaid credits")
    page.click("#send")
    meta = page.locator(".msg.assistant .turn-meta")
    meta.wait_for()
    assert re.fullmatch(r"\d+ prompt \+ 24 completion tokens · \$0\.\d+", meta.inner_text())
    chunks = int(page.get_attribute(".msg.assistant", "data-chunks") or "0")
    assert chunks > 1, "the answer arrived in one piece: not streamed"
    page.wait_for_function(
        "before => document.getElementById('balance').textContent !== '$' + before", arg=before
    )
    shot(page, "playground")
    playground_cost = money(meta.inner_text())

    # Usage: the chart, the table and the request log (the SDK's request by its id), CSV.
    page.goto("/dashboard/usage")
    page.locator("#chart-cost .uplot").wait_for()
    assert page.get_attribute("#chart-cost", "data-series") == "1"
    assert page.locator("#chart-tokens canvas").count() >= 1
    assert MODEL in page.inner_text("#usage-table")
    assert sdk_request_id in page.inner_text("#recent-requests")
    shot(page, "usage")
    with page.expect_download() as download:
        page.click("#csv-export")
    csv_text = Path(download.value.path()).read_text()
    assert csv_text.startswith("day,key_id,key_name,model,")
    assert "sdk" in csv_text and "Playground (managed by the dashboard)" in csv_text

    # The invoice PDF of the top-up, read back as text.
    page.goto("/dashboard/credits")
    shot(page, "credits")
    top_up = page.locator("#invoices tbody tr").first
    number = top_up.locator("td").first.inner_text()
    with page.expect_download() as download:
        top_up.locator("text=PDF").click()
    pdf_path = download.value.path()
    text = "\n".join(p.extract_text() for p in PdfReader(pdf_path).pages)
    assert f"invoice {number}" in text and "$12.34 USD" in text and "Analytical Engines" in text

    # A cap below the month's spend: the playground's next turn gets the 402 message.
    page.goto("/dashboard/limits")
    page.fill("#cap-form input[name=cap]", "0")
    page.click("#cap-form button[value=set]")
    assert "The spend cap is $0.00" in page.inner_text(".flash")
    assert "reached the spend cap" in page.inner_text(".banner")
    shot(page, "limits")
    page.goto("/dashboard/playground")
    page.fill("#prompt", "One more?")
    page.click("#send")
    error = page.locator("#pg-error")
    error.wait_for()
    assert error.inner_text().startswith("402: Monthly spend cap of $0.00 reached")
    page.goto("/dashboard/")
    assert page.locator("#recent-requests tr[data-status='402']").count() == 1
    shot(page, "overview")
    page.goto("/dashboard/alerts")
    shot(page, "alerts")

    # Revoke the SDK's key: its next request is refused.
    page.goto("/dashboard/keys")
    page.on("dialog", lambda dialog: dialog.accept())
    page.locator("#keys tr", has_text="sdk").locator("button.danger").click()
    assert "is revoked" in page.inner_text(".flash")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
        )
    assert float(playground_cost) > 0
    page.click("text=Sign out")
    page.wait_for_url("**/dashboard/signin")
    context.close()
