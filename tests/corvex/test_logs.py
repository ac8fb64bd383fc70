"""The log lines of the core and the edge: one JSON object per line, extras as fields."""

from __future__ import annotations

import json
import logging
import sys

from corvex.logs import JsonFormatter, TextFormatter

# 2026-12-01T23:59:59.250Z, then the next second.
_T = 1796169599.25


def _record(created: float, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(
        "corvex.requests", logging.INFO, "f.py", 1, "%s %s", ("Chat", "OK"), None
    )
    record.created, record.msecs = created, (created - int(created)) * 1000
    record.__dict__.update(extra)
    return record


def test_a_json_line_has_the_standard_fields_then_the_extras_in_order() -> None:
    line = JsonFormatter("core").format(
        _record(_T, request_id="req_1", cost_nano_usd=20650, _private=1)
    )
    assert list(json.loads(line).items()) == [
        ("ts", "2026-12-01T23:59:59.250Z"),
        ("level", "info"),
        ("process", "core"),
        ("logger", "corvex.requests"),
        ("msg", "Chat OK"),
        ("request_id", "req_1"),
        ("cost_nano_usd", 20650),
    ]


def test_the_timestamp_follows_the_clock_across_seconds() -> None:
    # The formatter keeps the whole second's text between lines: a new second must show.
    formatter = JsonFormatter("edge")
    stamps = [
        json.loads(formatter.format(_record(t)))["ts"] for t in (_T, _T + 0.7, _T + 1.0, _T - 86400)
    ]
    assert stamps == [
        "2026-12-01T23:59:59.250Z",
        "2026-12-01T23:59:59.950Z",
        "2026-12-02T00:00:00.250Z",
        "2026-11-30T23:59:59.250Z",
    ]


def test_an_exception_is_one_field_of_the_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, "f.py", 1, "failed", (), None)
        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter("core").format(record))
    assert entry["msg"] == "failed" and "ValueError: boom" in entry["exc"]


def test_a_text_line_ends_with_the_extras() -> None:
    line = TextFormatter("core").format(_record(_T, request_id="req_1"))
    assert line.endswith("core INFO    corvex.requests: Chat OK request_id=req_1")
