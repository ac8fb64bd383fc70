"""Invoice documents: one invoice per top-up, rendered as JSON, printable HTML or PDF.

Rendering only: the invoice itself (number, amount, balance after) is made by the ledger when
the credits land, and never changes afterwards.
"""

from __future__ import annotations

import datetime as dt
import html
import time
from typing import Final

import msgspec
from fpdf import FPDF

from corvex.money import format_usd
from corvex_core import errors
from corvex_core.records import TopUpMethod
from corvex_core.state import Invoice, Workspace

METHOD_LABELS = {
    TopUpMethod.MANUAL: "Prepaid credits",
    TopUpMethod.STARTER: "Starter credits",
    TopUpMethod.AUTO_RELOAD: "Prepaid credits (auto-reload)",
}


_MAX_INVOICE_DIGITS: Final = 12


def parse_invoice_number(text: str) -> int:
    """INV-000042 (or 42) → 42. ASCII digits only: `isdigit` alone would take "²" and "٣"."""
    digits = text.strip().upper().removeprefix("INV-")
    if not (1 <= len(digits) <= _MAX_INVOICE_DIGITS and digits.isascii() and digits.isdigit()):
        raise errors.InvalidRequest("invoice numbers look like INV-000001", param="number")
    return int(digits)


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


def _rows(invoice: Invoice, workspace: Workspace) -> list[tuple[str, str]]:
    return [
        ("Invoice", invoice.label),
        ("Issued", _timestamp(invoice.created_ms)),
        ("Workspace", f"{workspace.name} ({workspace.id})"),
        ("Description", METHOD_LABELS[invoice.method]),
        ("Amount", f"${format_usd(invoice.amount_nano)} USD"),
        ("Balance after top-up", f"${format_usd(invoice.balance_after_nano)} USD"),
    ]


def invoice_pdf(invoice: Invoice, workspace: Workspace) -> bytes:
    """The invoice as a one-page PDF (fpdf2, its built-in Helvetica: Latin-1 text only, so
    anything else in a workspace's name is replaced)."""
    pdf = FPDF(format="A4")
    pdf.set_title(f"Corvex invoice {invoice.label}")
    pdf.set_creation_date(dt.datetime.fromtimestamp(invoice.created_ms / 1000, dt.UTC))
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 18)
    pdf.cell(0, 12, f"Corvex: invoice {invoice.label}", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(4)
    for label, value in _rows(invoice, workspace):
        text = value.encode("latin-1", "replace").decode("latin-1")
        pdf.set_font("Helvetica", "", 11)
        pdf.set_text_color(90, 90, 90)
        pdf.cell(60, 9, label)
        pdf.set_text_color(0, 0, 0)
        pdf.set_font("Helvetica", "B" if label == "Amount" else "", 11)
        pdf.cell(0, 9, text, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(6)
    pdf.set_font("Helvetica", "", 10)
    pdf.cell(0, 8, "Prepaid credits never expire. Amounts in US dollars.")
    return bytes(pdf.output())


def invoice_html(invoice: Invoice, workspace: Workspace) -> bytes:
    esc = html.escape
    rows = _rows(invoice, workspace)
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
