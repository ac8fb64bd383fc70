"""The rate card: the one source of prices, loaded from infrastructure/metronome/config.yaml.

It owns parsing and validating the catalogue (every error names its file and line) and the
cost arithmetic of a request. It never holds a price that the money unit cannot represent
exactly, and nothing else in the project writes a price down.
"""

from __future__ import annotations

import calendar
import datetime as dt
import hashlib
from collections.abc import Mapping
from pathlib import Path

import msgspec
import yaml

from corvex.money import MoneyError, format_price, per_million_to_nano_per_token

_TOP_KEYS = {"version", "currency", "models"}
_MODEL_KEYS = {
    "id",
    "name",
    "card",
    "input_usd_per_million",
    "output_usd_per_million",
    "context_length",
    "listed",
}
_MAX_CONTEXT = 16_777_216


class RateCardError(ValueError):
    """The rate card is invalid. The message starts with `file:line:`."""


class ModelRate(msgspec.Struct, frozen=True):
    """A catalogue entry with its prices, as text (for people) and as nano-USD per token."""

    id: str
    name: str
    card_path: str
    input_usd_per_million: str
    output_usd_per_million: str
    input_nano_per_token: int
    output_nano_per_token: int
    context_length: int
    # When the model entered the catalogue (Unix seconds, OpenAI's `created`).
    listed_unix_s: int

    @property
    def owned_by(self) -> str:
        return self.id.split("/", 1)[0]

    def cost_nano(self, prompt_tokens: int, completion_tokens: int) -> int:
        """What a request costs: prompt at the input price, completion at the output price."""
        return (
            prompt_tokens * self.input_nano_per_token
            + completion_tokens * self.output_nano_per_token
        )


class RateCard(msgspec.Struct, frozen=True):
    """A validated, immutable rate card. A reload builds a new one."""

    version: str
    currency: str
    models: tuple[ModelRate, ...]
    # Hash of the file's content: two cards with one version label must have one digest.
    digest: str
    by_id: Mapping[str, ModelRate]

    def get(self, model_id: str) -> ModelRate | None:
        return self.by_id.get(model_id)


def load_rate_card(path: str | Path) -> RateCard:
    """Reads and validates the rate card file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RateCardError(f"{path}:0: cannot read the rate card: {exc.strerror}") from exc
    return parse_rate_card(text, source=str(path))


def parse_rate_card(text: str, *, source: str = "<rate card>") -> RateCard:
    """Validates rate card YAML. Prices are read from the YAML text itself, never via float."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        raise RateCardError(f"{source}:{line}: not valid YAML: {exc}") from exc
    if not isinstance(root, yaml.MappingNode):
        raise RateCardError(f"{source}:1: the rate card must be a mapping")
    top = _mapping(root, source, _TOP_KEYS)
    version = _scalar(top, "version", root, source)
    currency = _scalar(top, "currency", root, source)
    if currency != "USD":
        raise RateCardError(f"{source}:{_line(top['currency'])}: currency must be USD")
    models_node = top.get("models")
    if not isinstance(models_node, yaml.SequenceNode) or not models_node.value:
        raise RateCardError(f"{source}:{_line(models_node or root)}: `models` must be a list")
    models: list[ModelRate] = []
    seen: dict[str, int] = {}
    for node in models_node.value:
        model = _model(node, source)
        if model.id in seen:
            raise RateCardError(
                f"{source}:{_line(node)}: duplicate model id {model.id} "
                f"(first on line {seen[model.id]})"
            )
        seen[model.id] = _line(node)
        models.append(model)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return RateCard(
        version=version,
        currency=currency,
        models=tuple(models),
        digest=digest,
        by_id={m.id: m for m in models},
    )


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _mapping(node: yaml.MappingNode, source: str, allowed: set[str]) -> dict[str, yaml.Node]:
    result: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value)
        if key not in allowed:
            raise RateCardError(
                f"{source}:{_line(key_node)}: unknown key `{key}` "
                f"(expected one of {', '.join(sorted(allowed))})"
            )
        if key in result:
            raise RateCardError(f"{source}:{_line(key_node)}: `{key}` given twice")
        result[key] = value_node
    return result


def _scalar(fields: dict[str, yaml.Node], key: str, parent: yaml.Node, source: str) -> str:
    node = fields.get(key)
    if node is None:
        raise RateCardError(f"{source}:{_line(parent)}: missing `{key}`")
    if not isinstance(node, yaml.ScalarNode) or not str(node.value).strip():
        raise RateCardError(f"{source}:{_line(node)}: `{key}` must be a non-empty value")
    return str(node.value).strip()


def _model(node: yaml.Node, source: str) -> ModelRate:
    if not isinstance(node, yaml.MappingNode):
        raise RateCardError(f"{source}:{_line(node)}: each model must be a mapping")
    fields = _mapping(node, source, _MODEL_KEYS)
    missing = sorted(_MODEL_KEYS - fields.keys())
    if missing:
        raise RateCardError(f"{source}:{_line(node)}: model is missing {', '.join(missing)}")
    model_id = _scalar(fields, "id", node, source)
    if model_id.count("/") != 1 or any(not part for part in model_id.split("/")):
        raise RateCardError(f"{source}:{_line(fields['id'])}: id must look like `org/name`")
    card = _scalar(fields, "card", node, source)
    if card != f"/models/{model_id}":
        raise RateCardError(
            f"{source}:{_line(fields['card'])}: card must be /models/{model_id}, not {card}"
        )
    prices = {}
    for key in ("input_usd_per_million", "output_usd_per_million"):
        text = _scalar(fields, key, node, source)
        try:
            prices[key] = (format_price(text), per_million_to_nano_per_token(text))
        except MoneyError as exc:
            raise RateCardError(f"{source}:{_line(fields[key])}: {key}: {exc}") from None
    context = _scalar(fields, "context_length", node, source)
    if not context.isdigit() or not 1 <= int(context) <= _MAX_CONTEXT:
        raise RateCardError(
            f"{source}:{_line(fields['context_length'])}: context_length must be an integer "
            f"from 1 to {_MAX_CONTEXT}"
        )
    listed = _scalar(fields, "listed", node, source)
    try:
        listed_date = dt.date.fromisoformat(listed)
    except ValueError:
        raise RateCardError(
            f"{source}:{_line(fields['listed'])}: listed must be a date (YYYY-MM-DD)"
        ) from None
    return ModelRate(
        id=model_id,
        name=_scalar(fields, "name", node, source),
        card_path=card,
        input_usd_per_million=prices["input_usd_per_million"][0],
        output_usd_per_million=prices["output_usd_per_million"][0],
        input_nano_per_token=prices["input_usd_per_million"][1],
        output_nano_per_token=prices["output_usd_per_million"][1],
        context_length=int(context),
        listed_unix_s=calendar.timegm(listed_date.timetuple()),
    )
