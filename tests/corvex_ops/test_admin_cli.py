"""`corvex admin` as an operator types it, against the real core: JSON out, money as exact
USD strings, CSV usage, invoices as JSON and HTML, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest

from corvex_ops.stack import Stack
from tests.conftest import ADMIN_TOKEN, MODEL

pytestmark = pytest.mark.e2e


def admin(stack: Stack, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corvex_cli", "admin", "--core", stack.grpc_address,
         "--admin-token", ADMIN_TOKEN, *args],
        capture_output=True, text=True, check=check, timeout=60,
    )  # fmt: skip


def admin_json(stack: Stack, *args: str) -> Any:
    return json.loads(admin(stack, *args).stdout)


def test_an_operators_session(stack: Stack, tmp_path: Path) -> None:
    ws = admin_json(stack, "workspace", "create", "--name", "acme", "--starter-credits", "2.50")
    assert ws["balance_usd"] == "2.50" and ws["name"] == "acme"
    ws_id = ws["id"]
    added = admin_json(stack, "credits", "add", ws_id, "25.00", "--idempotency-key", "po-7")
    again = admin_json(stack, "credits", "add", ws_id, "25.00", "--idempotency-key", "po-7")
    assert added["invoice"]["number"] == again["invoice"]["number"]
    assert (added["replayed"], again["replayed"]) == (False, True)
    assert again["workspace"]["balance_usd"] == "27.50"
    capped = admin_json(stack, "cap", "set", ws_id, "500")
    assert capped["spend_cap_usd"] == "500.00"
    assert admin_json(stack, "cap", "remove", ws_id)["spend_cap_usd"] is None
    reload = admin_json(stack, "auto-reload", "set", ws_id, "--threshold", "5", "--amount", "20")
    assert reload["auto_reload"] == {
        "enabled": True, "threshold_usd": "5.00", "amount_usd": "20.00", "last_error": None
    }  # fmt: skip
    created = admin_json(stack, "key", "create", ws_id, "--name", "ci", "--rpm", "60")
    key_id, secret = created["key"]["id"], created["secret"]
    assert secret.startswith("corvex-") and created["key"]["prefix"] == secret[:11]
    limits = admin_json(stack, "key", "limits", key_id, "--tpm", "100000", "--rpm", "none")
    assert limits["limits"] == {
        "requests_per_minute": None, "tokens_per_minute": 100000, "monthly_tokens": None
    }  # fmt: skip
    listed = admin_json(stack, "key", "list", ws_id)
    assert [k["id"] for k in listed] == [key_id] and "secret" not in listed[0]

    with openai.OpenAI(base_url=stack.http_url + "/v1", api_key=secret, max_retries=0) as client:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "bill me"}], max_tokens=4
        )
    csv_text = admin(stack, "usage", ws_id, "--format", "csv").stdout
    header, row = csv_text.strip().splitlines()
    assert header == (
        "day,key_id,model,requests,prompt_tokens,completion_tokens,cost_usd,endpoint_id,"
        "replica_seconds"
    )
    assert row.split(",")[1:4] == [key_id, MODEL, "1"]
    assert admin_json(stack, "usage", ws_id, "--since", "2000-01-01", "--until", "2000-12-31") == []

    invoices = admin_json(stack, "invoice", "list", ws_id)
    assert [i["method"] for i in invoices] == ["starter", "manual"]
    document = json.loads(admin(stack, "invoice", "get", invoices[1]["number"]).stdout)
    assert document["amount"] == "25.00" and document["balance_after"] == "27.50"
    html = tmp_path / "invoice.html"
    admin(stack, "invoice", "get", invoices[1]["number"], "--format", "html", "-o", str(html))
    assert "<html" in html.read_text() and "$25.00 USD" in html.read_text()

    revoked = admin_json(stack, "key", "revoke", key_id)
    assert revoked["revoked"] is True


def test_errors_are_sentences_and_exit_codes(stack: Stack) -> None:
    missing = admin(stack, "workspace", "show", "ws_nope", check=False)
    assert missing.returncode == 1 and "No workspace ws_nope" in missing.stderr
    bad_amount = admin(stack, "credits", "add", "ws_x", "1.001", check=False)
    assert bad_amount.returncode == 2 and "whole number of cents" in bad_amount.stderr
    wrong_token = subprocess.run(
        [sys.executable, "-m", "corvex_cli", "admin", "--core", stack.grpc_address,
         "--admin-token", "wrong", "workspace", "list"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert wrong_token.returncode == 1 and "PERMISSION_DENIED" in wrong_token.stderr
