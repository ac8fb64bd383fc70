"""The rate card: the one source of prices, loaded from infrastructure/metronome/config.yaml.

It owns parsing and validating the catalogue (every error names its file and line), the cost
arithmetic of a request, and the reserved offerings (dedicated replicas by the hour, accrued
by the minute). It never holds a price that the money unit cannot represent exactly, and
nothing else in the project writes a price down.
"""

from __future__ import annotations

import calendar
import datetime as dt
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

import msgspec
import yaml

from corvex.money import MoneyError, format_price, per_million_to_nano_per_token, usd_to_nano

_TOP_KEYS = {"version", "currency", "models", "reserved"}
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
_OFFERING_KEYS = {"id", "model", "gpus_per_replica", "usd_per_replica_hour", "minimum_hours"}
_OFFERING_REQUIRED = _OFFERING_KEYS - {"minimum_hours"}
_OFFERING_ID = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,46}[a-z0-9])?$")
MAX_GPUS_PER_REPLICA = 64
# A minimum term longer than a month is a contract, not a prepaid rental.
MAX_MINIMUM_HOURS = 744
# Reserved capacity accrues by the minute: an hourly price must split into whole nano-USD
# minutes, so that every minute costs the same and sixty of them cost exactly the hour.
SECONDS_PER_HOUR = 3600
ACCRUAL_SECONDS = 60


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


class ReservedOffering(msgspec.Struct, frozen=True):
    """Dedicated replicas of one model, rented by the replica-hour and accrued by the minute."""

    id: str
    model: str
    gpus_per_replica: int
    # Canonical decimal text ("2.52") and the same price in nano-USD.
    usd_per_replica_hour: str
    nano_per_replica_hour: int
    # The first period of a new endpoint lasts at least this long (0: one accrual period).
    minimum_hours: int = 0

    def nano_per_replica_period(self, period_s: int) -> int:
        """The price of one replica for `period_s` seconds, exactly; ValueError when the
        period does not split the hourly price into whole nano-USD."""
        assert 1 <= period_s <= SECONDS_PER_HOUR
        scaled = self.nano_per_replica_hour * period_s
        if scaled % SECONDS_PER_HOUR:
            raise ValueError(
                f"reserved offering {self.id}: ${self.usd_per_replica_hour} per replica-hour is "
                f"not a whole number of nano-USD per {period_s} s"
            )
        return scaled // SECONDS_PER_HOUR


class RateCard(msgspec.Struct, frozen=True):
    """A validated, immutable rate card. A reload builds a new one."""

    version: str
    currency: str
    models: tuple[ModelRate, ...]
    # Hash of the file's content: two cards with one version label must have one digest.
    digest: str
    by_id: Mapping[str, ModelRate]
    reserved: tuple[ReservedOffering, ...] = ()
    offerings: Mapping[str, ReservedOffering] = msgspec.field(default_factory=dict)

    def get(self, model_id: str) -> ModelRate | None:
        return self.by_id.get(model_id)

    def offerings_of(self, model_id: str) -> list[ReservedOffering]:
        """The reserved offerings of a model, in rate-card order."""
        return [offering for offering in self.reserved if offering.model == model_id]


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
    by_id = {m.id: m for m in models}
    reserved = _offerings(top.get("reserved"), by_id, source)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return RateCard(
        version=version,
        currency=currency,
        models=tuple(models),
        digest=digest,
        by_id=by_id,
        reserved=tuple(reserved),
        offerings={o.id: o for o in reserved},
    )


def _offerings(
    node: yaml.Node | None, models: Mapping[str, ModelRate], source: str
) -> list[ReservedOffering]:
    """The `reserved:` section: optional, but a list of offerings when present."""
    if node is None:
        return []
    if not isinstance(node, yaml.SequenceNode):
        raise RateCardError(f"{source}:{_line(node)}: `reserved` must be a list of offerings")
    offerings: list[ReservedOffering] = []
    seen: dict[str, int] = {}
    for item in node.value:
        offering = _offering(item, models, source)
        if offering.id in seen:
            raise RateCardError(
                f"{source}:{_line(item)}: duplicate offering id {offering.id} "
                f"(first on line {seen[offering.id]})"
            )
        seen[offering.id] = _line(item)
        offerings.append(offering)
    return offerings


def _offering(node: yaml.Node, models: Mapping[str, ModelRate], source: str) -> ReservedOffering:
    if not isinstance(node, yaml.MappingNode):
        raise RateCardError(f"{source}:{_line(node)}: each reserved offering must be a mapping")
    fields = _mapping(node, source, _OFFERING_KEYS)
    missing = sorted(_OFFERING_REQUIRED - fields.keys())
    if missing:
        raise RateCardError(f"{source}:{_line(node)}: offering is missing {', '.join(missing)}")
    offering_id = _scalar(fields, "id", node, source)
    if _OFFERING_ID.match(offering_id) is None:
        raise RateCardError(
            f"{source}:{_line(fields['id'])}: an offering id is 1 to 48 of a-z, 0-9, `.` and "
            f"`-`, starting and ending with a letter or digit, not `{offering_id}`"
        )
    model = _scalar(fields, "model", node, source)
    if model not in models:
        raise RateCardError(
            f"{source}:{_line(fields['model'])}: offering {offering_id}: model {model} is not "
            "in `models`"
        )
    gpus = _integer(fields, "gpus_per_replica", node, source, low=1, high=MAX_GPUS_PER_REPLICA)
    hours = (
        _integer(fields, "minimum_hours", node, source, low=0, high=MAX_MINIMUM_HOURS)
        if "minimum_hours" in fields
        else 0
    )
    price = _scalar(fields, "usd_per_replica_hour", node, source)
    where = f"{source}:{_line(fields['usd_per_replica_hour'])}: usd_per_replica_hour"
    try:
        nano = usd_to_nano(price)
    except MoneyError as exc:
        raise RateCardError(f"{where}: {exc}") from None
    if nano <= 0:
        raise RateCardError(f"{where}: ${price} per replica-hour must be positive")
    if nano % (SECONDS_PER_HOUR // ACCRUAL_SECONDS):
        raise RateCardError(
            f"{where}: ${price} per replica-hour is not a whole number of nano-USD per minute "
            "(reserved capacity accrues by the minute); use a multiple of $0.00000006, "
            "such as $2.49 or $2.52"
        )
    return ReservedOffering(
        id=offering_id,
        model=model,
        gpus_per_replica=gpus,
        usd_per_replica_hour=format_price(price),
        nano_per_replica_hour=nano,
        minimum_hours=hours,
    )


def _integer(
    fields: dict[str, yaml.Node], key: str, parent: yaml.Node, source: str, *, low: int, high: int
) -> int:
    text = _scalar(fields, key, parent, source)
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise RateCardError(
            f"{source}:{_line(fields[key])}: {key} must be an integer from {low} to {high}"
        )
    return int(text)


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
