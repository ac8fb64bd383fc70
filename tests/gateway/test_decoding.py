"""Request bodies: every malformed body a 400 that names the field."""

from __future__ import annotations

import pytest

from gateway import decoding
from gateway.errors import BadRequest
from gateway.openai_types import chat_decoder


def refusal(body: bytes) -> BadRequest:
    with pytest.raises(BadRequest) as refused:
        decoding.parse(body, chat_decoder)
    return refused.value


def test_a_wrong_type_names_the_field() -> None:
    error = refusal(b'{"model":"m/m","messages":[],"temperature":"hot"}')
    assert error.body.param == "temperature"


def test_not_json_at_all() -> None:
    assert "parse the JSON body" in refusal(b"model=m&messages=x").body.message
