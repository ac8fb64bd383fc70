"""The one rule for request ids that edge and core share."""

from __future__ import annotations

import pytest

from corvex.request_ids import MAX_REQUEST_ID_CHARS, request_id


def test_a_sane_id_is_kept() -> None:
    assert request_id("trace-abc-123") == "trace-abc-123"
    assert request_id("x" * MAX_REQUEST_ID_CHARS) == "x" * MAX_REQUEST_ID_CHARS


@pytest.mark.parametrize("supplied", [None, "", "x" * (MAX_REQUEST_ID_CHARS + 1), "é", "a\nb"])
def test_anything_else_gets_a_new_random_id(supplied: str | None) -> None:
    made = request_id(supplied)
    assert made != supplied and len(made) == 32 and made != request_id(supplied)
