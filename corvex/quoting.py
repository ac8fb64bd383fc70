"""How an error message quotes what a caller sent (a model id, a role, a path, a header value):
one rule for the edge and the core, so no error grows with the caller's input.

Enough to recognise the text, never enough to push an error past what gRPC metadata carries
(16 KiB) or to echo a secret pasted into the wrong field at length.
"""

from __future__ import annotations

from typing import Final

MAX_QUOTE_CHARS: Final = 80


def bounded(text: str, max_chars: int) -> str:
    """`text` cut to `max_chars` characters, marked with an ellipsis if it was cut."""
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def quote(text: str) -> str:
    """Caller-supplied text as an error message quotes it: bounded, in backticks, with
    unprintable characters escaped."""
    shown = bounded(text, MAX_QUOTE_CHARS)
    if not shown.isprintable():
        shown = shown.encode("unicode_escape").decode("ascii")
    return f"`{shown}`"
