"""Model ids and quoting: the one bound, the one sentence for an unknown model (the core
uses it) and the one quoting rule that edge and core share (corvex.quoting)."""

from __future__ import annotations

import pytest

from corvex import model_ids, quoting
from corvex_core import errors

IDS = ["nope/nope", "m" * 9000, "é" * 3000, "evil\x00\nmodel"]


@pytest.mark.parametrize("model", IDS, ids=["short", "long", "non-ascii", "unprintable"])
def test_the_core_words_an_unknown_model_with_the_shared_sentence(model: str) -> None:
    assert errors.ModelNotFound(model).message == model_ids.not_served(model)


def test_a_quote_is_bounded_in_backticks_and_printable() -> None:
    assert quoting.quote("a/b") == "`a/b`"
    long = quoting.quote("m" * 9000)
    assert long == "`" + "m" * (quoting.MAX_QUOTE_CHARS - 1) + "…`"
    assert quoting.quote("a\x00b") == "`a\\x00b`"
