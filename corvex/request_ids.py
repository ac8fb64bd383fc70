"""Request ids: one rule for the edge and the core, so a request keeps its id end to end.

A caller's `x-request-id` is kept when it is short, printable ASCII; anything else (or none)
gets a new random id. The id is for following a request in logs and usage records, so it is
bounded and never trusted for anything else.
"""

from __future__ import annotations

import secrets
from typing import Final

MAX_REQUEST_ID_CHARS: Final = 128


def request_id(supplied: str | None) -> str:
    """The caller's id if it is sane, else a new one."""
    if (
        supplied
        and len(supplied) <= MAX_REQUEST_ID_CHARS
        and supplied.isascii()
        and supplied.isprintable()
    ):
        return supplied
    return secrets.token_hex(16)
