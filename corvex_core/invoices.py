"""Invoice documents: one invoice per top-up, rendered as JSON or as printable HTML.

Rendering only: the invoice itself (number, amount, balance after) is made by the ledger when
the credits land, and never changes afterwards.
"""

from __future__ import annotations

import html
import time

import msgspec

from corvex.money import format_usd
from corvex_core.records import TopUpMethod
from corvex_core.state import Invoice, Workspace

METHOD_LABELS = {
    TopUpMethod.MANUAL: "Prepaid credits",
    TopUpMethod.STARTER: "Starter credits",
    TopUpMethod.AUTO_RELOAD: "Prepaid credits (auto-reload)",
}


def _timestamp(at_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at_ms / 1000))


def invoice_json(invoice: Invoice, workspace: Workspace) -> bytes:
    return msgspec.json.format(
        msgspec.json.encode(
            {
                "number": invoice.label,
                "workspace": {"id": workspace.id, "name": workspace.name},
                "issued_at": _timestamp(invoice.created_ms),
                "description": METHOD_LABELS[invoice.method],
                "method": invoice.method,
                "currency": "USD",
                "amount": format_usd(invoice.amount_nano),
                "balance_after": format_usd(invoice.balance_after_nano),
                "idempotency_key": invoice.idempotency_key,
            }
        ),
        indent=2,
    )


def invoice_html(invoice: Invoice, workspace: Workspace) -> bytes:
    esc = html.escape
    rows = [
        ("Invoice", invoice.label),
        ("Issued", _timestamp(invoice.created_ms)),
        ("Workspace", f"{workspace.name} ({workspace.id})"),
        ("Description", METHOD_LABELS[invoice.method]),
        ("Amount", f"${format_usd(invoice.amount_nano)} USD"),
        ("Balance after top-up", f"${format_usd(invoice.balance_after_nano)} USD"),
    ]
    body = "\n".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Corvex invoice {esc(invoice.label)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; color: #111; }}
h1 {{ font-size: 1.4rem; }} table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .5rem; border-bottom: 1px solid #ddd; }}
th {{ width: 40%; color: #555; font-weight: normal; }}
.total td {{ font-weight: bold; }} @media print {{ body {{ margin: 0; }} }}
</style></head>
<body>
<h1>Corvex: invoice {esc(invoice.label)}</h1>
<table>
{body}
</table>
<p>Prepaid credits never expire. Amounts in US dollars.</p>
</body></html>
""".encode()
