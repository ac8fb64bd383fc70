"""Request bodies: the JSON content type only (leniently, as the SDKs and curl send it), and
every malformed body a 400 that names the field and quotes next to nothing."""

from __future__ import annotations

import pytest

from gateway import decoding
from gateway.errors import BadRequest
from gateway.openai_types import MAX_ROLE_CHARS, chat_decoder

PREFIX = b'{"model":"m/m","messages":[{"role":"user","content":"x"}]'


def refusal(body: bytes) -> BadRequest:
    with pytest.raises(BadRequest) as refused:
        decoding.parse(body, chat_decoder)
    return refused.value


@pytest.mark.parametrize(
    "value", [None, "", "application/json", "application/json; charset=utf-8", "Application/JSON"]
)
def test_json_content_types_are_accepted(value: str | None) -> None:
    decoding.check_content_type(value)


@pytest.mark.parametrize(
    "value", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"]
)
def test_other_content_types_are_refused_as_openai_does(value: str) -> None:
    with pytest.raises(BadRequest) as refused:
        decoding.check_content_type(value)
    assert refused.value.body.code == "unsupported_content_type"
    assert "application/json" in refused.value.body.message


def test_invalid_utf8_inside_a_string_is_a_400() -> None:
    error = refusal(b'{"model":"m/m","messages":[{"role":"user","content":"\xff\xfe"}]}')
    assert "UTF-8" in error.body.message


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deep_nesting_is_a_400(depth: int) -> None:
    error = refusal(PREFIX + b',"extra":' + b"[" * depth + b"]" * depth + b"}")
    assert "nested too deeply" in error.body.message


def test_a_wrong_type_names_the_field() -> None:
    error = refusal(PREFIX + b',"temperature":"hot"}')
    assert error.body.param == "temperature"


def test_an_unbounded_value_is_never_quoted_back() -> None:
    secret_sized = "x" * 9000
    error = refusal(
        b'{"model":"m/m","messages":[{"role":"user","content":[{"type":"'
        + secret_sized.encode()
        + b'","text":"a"}]}]}'
    )
    assert error.body.param == "messages[0].content[0].type"
    assert len(error.body.message) < 300


def test_model_ids_and_roles_are_bounded() -> None:
    assert refusal(b'{"model":"' + b"m" * 9000 + b'","messages":[]}').body.param == "model"
    role = b"r" * (MAX_ROLE_CHARS + 1)
    body = b'{"model":"m/m","messages":[{"role":"' + role + b'","content":"x"}]}'
    assert refusal(body).body.param == "messages[0].role"


def test_not_json_at_all() -> None:
    assert "parse the JSON body" in refusal(b"model=m&messages=x").body.message
