"""Model ids: what the edge and the core agree on about them, so it is written once.

A model id is at most `MAX_MODEL_ID_CHARS` characters (Hugging Face repository ids, the
longest ids in use, stay well under it); the edge refuses longer ones with a 400 naming
`model` before calling the core. `not_served` is the sentence a caller gets for an id the
catalogue does not have, from either process.
"""

from __future__ import annotations

from typing import Final

from corvex.quoting import quote

MAX_MODEL_ID_CHARS: Final = 256


def not_served(model: str) -> str:
    return (
        f"The model {quote(model)} does not exist or is not served here; "
        "GET /v1/models lists the models you can use."
    )
