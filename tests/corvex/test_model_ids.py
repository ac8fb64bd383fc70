"""Model ids: the one bound and the one sentence for an unknown model that edge and core share."""

from __future__ import annotations

from corvex import model_ids
from corvex_core import errors


def test_the_core_words_an_unknown_model_with_the_shared_sentence() -> None:
    assert errors.ModelNotFound("nope/nope").message == model_ids.not_served("nope/nope")


def test_the_sentence_quotes_a_bounded_part_of_the_id() -> None:
    sentence = model_ids.not_served("m" * 9000)
    assert len(sentence) < model_ids.MAX_QUOTED_CHARS + 100
    assert "m" * (model_ids.MAX_QUOTED_CHARS - 1) + "…" in sentence
