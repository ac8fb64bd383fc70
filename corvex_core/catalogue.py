"""The catalogue: the current rate card joined with the engines that serve its models.

A model is served when it is on the rate card and this core has an engine for it (a GPU node
may host only some of the card). The rate card can be
replaced at run time (`replace`): the next admission uses the new prices, while requests
already admitted keep the rate they were admitted with (their hold carries it).
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from corvex.ratecard import ModelRate, RateCard
from corvex_core import errors
from corvex_core.engines.base import Engine


class Served(msgspec.Struct, frozen=True):
    """A served model: its price, the rate-card version of that price, and its engine."""

    rate: ModelRate
    rate_card_version: str
    engine: Engine
    # A reserved endpoint's replica: the endpoint's id, and the bounded label its calls get in
    # metrics (its base model, not its own model id). Empty on the shared fleet.
    endpoint_id: str = ""
    metric_model: str = ""

    @property
    def label(self) -> str:
        """The model its calls are counted under in metrics: a catalogue id or a reserved one."""
        return self.metric_model or self.rate.id


class Catalogue:
    def __init__(self, rate_card: RateCard, engines: Iterable[Engine]) -> None:
        self._engines = {engine.model_id: engine for engine in engines}
        assert all(rate_card.get(model_id) for model_id in self._engines)
        self._rate_card = rate_card

    @property
    def rate_card(self) -> RateCard:
        return self._rate_card

    @property
    def engines(self) -> list[Engine]:
        return list(self._engines.values())

    def lookup(self, model_id: str) -> Served:
        """A served model. Raises ModelNotFound for anything not on the rate card."""
        card = self._rate_card
        rate = card.get(model_id)
        engine = self._engines.get(model_id)
        if rate is None or engine is None:
            raise errors.ModelNotFound(model_id)
        return Served(rate, card.version, engine)

    def has_engine(self, model_id: str) -> bool:
        return model_id in self._engines

    def replace(self, rate_card: RateCard, new_engines: Iterable[Engine]) -> list[Engine]:
        """Puts a new rate card in force, with engines for the models it adds. Returns the
        engines of models it no longer lists: they finish what they run, then retire."""
        for engine in new_engines:
            assert engine.model_id not in self._engines
            self._engines[engine.model_id] = engine
        self._rate_card = rate_card
        return [e for model_id, e in self._engines.items() if rate_card.get(model_id) is None]

    def retire(self, engine: Engine) -> bool:
        """Forgets an engine whose model left the rate card; False if the model came back."""
        if self._rate_card.get(engine.model_id) is not None:
            return False
        return self._engines.pop(engine.model_id, None) is not None

    def served(self) -> list[Served]:
        """The models this core serves, in rate-card order."""
        card = self._rate_card
        return [
            Served(rate, card.version, self._engines[rate.id])
            for rate in card.models
            if rate.id in self._engines
        ]
