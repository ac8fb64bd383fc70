"""JSON Schema for requests: checking a client's schema, and a bounded instance generator.

`check_schema` is what every engine runs on a response_format or tool schema before it serves
the request (a valid Draft 2020-12 schema, within size bounds), so an invalid one is a 400 that
names the param. `generate_instance` is the simulated engine's stand-in for constrained
decoding: a deterministic JSON value valid against the schema, for the subset OpenAI's strict
mode allows (object with properties/required/additionalProperties, array with items/prefixItems
and min/maxItems, string with enum/const/format/min/maxLength, number and integer with
minimum/maximum (exclusive too) and multipleOf, boolean, null, anyOf/oneOf, single allOf,
$defs/definitions with local $ref, recursion) and a little more. It never loops: nesting, sizes
and attempts are bounded, and every value it returns has been validated with `jsonschema`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import jsonschema
import jsonschema.exceptions

# Bounds on the schemas a request may carry (OpenAI: 5,000 properties, 10 levels of nesting).
MAX_SCHEMA_NODES: Final = 5_000  # dicts and lists in the schema document
MAX_SCHEMA_DEPTH: Final = 64  # nesting of the document itself
# Bounds on what the generator makes.
MAX_INSTANCE_DEPTH: Final = 10  # nesting of the value (OpenAI's limit for schemas)
MAX_INSTANCE_NODES: Final = 2_000  # values in one instance
MAX_ITEMS: Final = 100  # a minItems beyond this is refused
MAX_STRING_CHARS: Final = 2_000  # a minLength beyond this is refused
MAX_ATTEMPTS: Final = 8  # tries with other choices before a schema is called unsatisfiable

# Keywords that only annotate; the generator ignores them.
_ANNOTATIONS: Final = frozenset(
    {
        "$schema",
        "$id",
        "$comment",
        "$anchor",
        "title",
        "description",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "contentEncoding",
        "contentMediaType",
    }
)
_HANDLED: Final = frozenset(
    {
        "type",
        "enum",
        "const",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "uniqueItems",
        "minLength",
        "maxLength",
        "format",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "$defs",
        "definitions",
        "minProperties",
        "maxProperties",
    }
)

# One valid example per string format OpenAI's strict mode lists, varied by a counter.
_FORMATS: Final[Mapping[str, Callable[[int], str]]] = {
    "date-time": lambda i: f"2026-11-{1 + i % 28:02d}T{i % 24:02d}:00:00Z",
    "date": lambda i: f"2026-11-{1 + i % 28:02d}",
    "time": lambda i: f"{i % 24:02d}:{i % 60:02d}:00Z",
    "duration": lambda i: f"P{1 + i % 30}D",
    "email": lambda i: f"user{i}@example.com",
    "hostname": lambda i: f"host{i}.example.com",
    "ipv4": lambda i: f"192.0.2.{i % 256}",
    "ipv6": lambda i: f"2001:db8::{i % 65536:x}",
    "uuid": lambda i: f"00000000-0000-4000-8000-{i % 10**12:012d}",
    "uri": lambda i: f"https://example.com/{i}",
}

_WORDS: Final = (
    "alpha",
    "ledger",
    "steady",
    "token",
    "credit",
    "bounded",
    "river",
    "signal",
    "plain",
    "quiet",
    "exact",
    "answer",
)


def _bound(
    schema: Mapping[str, Any], inclusive: str, exclusive: str, tighter: Callable[..., float]
) -> tuple[float | None, bool]:
    """The tighter of a schema's inclusive and exclusive bound, and whether it is exclusive."""
    closed, open_ = schema.get(inclusive), schema.get(exclusive)
    if open_ is None or isinstance(open_, bool):  # draft 4's boolean form is not supported
        return (None if closed is None else float(closed)), False
    if closed is None or tighter(float(closed), float(open_)) == float(open_):
        return float(open_), True
    return float(closed), False


class SchemaError(ValueError):
    """A schema that is invalid, too large, or that the generator cannot satisfy."""


def check_schema(schema: object) -> None:
    """Raises SchemaError unless `schema` is a valid JSON Schema within the size bounds."""
    if not isinstance(schema, (dict, bool)):
        raise SchemaError("a JSON Schema must be an object")
    _check_size(schema)
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)  # type: ignore[arg-type]
    except jsonschema.exceptions.SchemaError as exc:
        raise SchemaError(f"invalid JSON Schema: {exc.message}") from None


def _check_size(schema: object) -> None:
    nodes = 0
    stack: list[tuple[object, int]] = [(schema, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Sequence[object] = list(node.values())
        elif isinstance(node, list):
            children = node
        else:
            continue
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise SchemaError(f"the schema is too large (more than {MAX_SCHEMA_NODES} nodes)")
        if depth > MAX_SCHEMA_DEPTH:
            raise SchemaError(f"the schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)


def generate_instance(schema: Mapping[str, Any] | bool, rng: random.Random) -> Any:
    """A JSON value valid against `schema`, chosen by `rng`; raises SchemaError if it cannot.

    Tries a few times with other choices (anyOf branches, optional properties), and checks
    every candidate with jsonschema, so a value it returns is valid.
    """
    validator_class = jsonschema.validators.validator_for(
        schema, default=jsonschema.Draft202012Validator
    )
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    last_problem = "no valid value was found"
    for attempt in range(MAX_ATTEMPTS):
        generator = _Generator(schema, rng, minimal=attempt == MAX_ATTEMPTS - 1)
        value = generator.value(schema, 0)
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is None:
            return value
        last_problem = error.message
    raise SchemaError(f"the simulated engine cannot satisfy this schema: {last_problem}")


class _Generator:
    """One attempt: walks the schema, choosing with the rng, within the bounds."""

    def __init__(self, root: Mapping[str, Any] | bool, rng: random.Random, *, minimal: bool):
        self._root = root
        self._rng = rng
        self._minimal = minimal
        self._nodes = 0

    def value(self, schema: Mapping[str, Any] | bool, depth: int) -> Any:
        self._nodes += 1
        if self._nodes > MAX_INSTANCE_NODES:
            raise SchemaError(
                f"an instance of this schema has more than {MAX_INSTANCE_NODES} values"
            )
        if depth > MAX_INSTANCE_DEPTH:
            raise SchemaError(
                f"this schema has no instance nested at most {MAX_INSTANCE_DEPTH} levels deep"
            )
        if schema is True:
            return self._any_scalar()
        if schema is False:
            raise SchemaError("the schema `false` has no instance")
        unsupported = sorted(set(schema) - _HANDLED - _ANNOTATIONS)
        if unsupported:
            raise SchemaError(
                f"the simulated engine cannot generate JSON for the keyword `{unsupported[0]}`"
            )
        if "$ref" in schema:
            return self.value(self._resolve(schema["$ref"]), depth + 1)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return self._rng.choice(list(schema["enum"]))
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.value(self._branch(schema[key], depth), depth + 1)
        if "allOf" in schema:
            parts = schema["allOf"]
            if len(parts) != 1:
                raise SchemaError("the simulated engine supports allOf with a single schema only")
            return self.value(parts[0], depth + 1)
        return self._typed(schema, self._type(schema), depth)

    def _resolve(self, ref: str) -> Mapping[str, Any] | bool:
        if ref == "#":
            return self._root
        if not ref.startswith("#/"):
            raise SchemaError(f"only local $ref are supported, not {ref!r}")
        node: Any = self._root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise SchemaError(f"$ref {ref!r} points at nothing")
            node = node[part]
        if not isinstance(node, (dict, bool)):
            raise SchemaError(f"$ref {ref!r} is not a schema")
        return node

    def _branch(self, branches: Sequence[Any], depth: int) -> Any:
        # Deep down (or on the last attempt), prefer a branch that ends the nesting: a scalar or
        # null, so recursive schemas (trees, linked lists) stay finite.
        if self._minimal or depth >= MAX_INSTANCE_DEPTH // 2:
            for branch in branches:
                if isinstance(branch, dict) and self._is_leaf(branch):
                    return branch
        return self._rng.choice(list(branches))

    @staticmethod
    def _is_leaf(schema: Mapping[str, Any]) -> bool:
        kind = schema.get("type")
        return "$ref" not in schema and kind in ("null", "string", "number", "integer", "boolean")

    def _type(self, schema: Mapping[str, Any]) -> str:
        kind = schema.get("type")
        if isinstance(kind, list):
            options = [k for k in kind if k != "null"] or ["null"]
            return str(self._rng.choice(options))
        if isinstance(kind, str):
            return kind
        # No type: infer it from the keywords present.
        if "properties" in schema or "required" in schema or "additionalProperties" in schema:
            return "object"
        if "items" in schema or "prefixItems" in schema:
            return "array"
        if "minLength" in schema or "maxLength" in schema or "format" in schema:
            return "string"
        if any(k in schema for k in ("minimum", "maximum", "multipleOf")):
            return "number"
        return "string"

    def _typed(self, schema: Mapping[str, Any], kind: str, depth: int) -> Any:
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind == "string":
            return self._string(schema)
        if kind in ("number", "integer"):
            return self._number(schema, integer=kind == "integer")
        if kind == "boolean":
            return self._rng.random() < 0.5
        if kind == "null":
            return None
        raise SchemaError(f"unknown type {kind!r}")

    def _object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        properties: Mapping[str, Any] = schema.get("properties", {})
        required = set(schema.get("required", ()))
        result: dict[str, Any] = {}
        for name, subschema in properties.items():
            optional = name not in required
            if optional and (self._minimal or depth >= MAX_INSTANCE_DEPTH // 2):
                continue
            if optional and self._rng.random() < 0.25:
                continue
            result[name] = self.value(subschema, depth + 1)
        for name in sorted(required - set(result)):
            # Required but not described: anything goes, unless extra properties are constrained.
            extra = schema.get("additionalProperties", True)
            result[name] = self.value(extra if isinstance(extra, dict) else True, depth + 1)
        wanted = int(schema.get("minProperties", 0))
        extra = schema.get("additionalProperties", True)
        while len(result) < wanted and extra is not False:
            result[f"{_WORDS[len(result) % len(_WORDS)]}{len(result)}"] = self.value(
                extra if isinstance(extra, dict) else True, depth + 1
            )
        return result

    def _array(self, schema: Mapping[str, Any], depth: int) -> list[Any]:
        low = int(schema.get("minItems", 0))
        high = int(schema.get("maxItems", max(low, 3)))
        if low > MAX_ITEMS:
            raise SchemaError(f"minItems above {MAX_ITEMS} is not supported")
        high = min(high, max(low, 3))
        prefix: Sequence[Any] = schema.get("prefixItems", ())
        count = (
            low
            if self._minimal or depth >= MAX_INSTANCE_DEPTH // 2
            else self._rng.randint(max(low, min(1, high)), high)
        )
        count = max(count, min(len(prefix), high))
        items = schema.get("items", True)
        result: list[Any] = []
        for index in range(count):
            subschema = prefix[index] if index < len(prefix) else items
            if subschema is False:
                break
            value = self.value(subschema, depth + 1)
            if schema.get("uniqueItems") and value in result:
                continue  # a shorter array is still valid unless minItems says otherwise
            result.append(value)
        return result

    def _string(self, schema: Mapping[str, Any]) -> str:
        fmt = schema.get("format")
        if fmt is not None:
            make = _FORMATS.get(fmt)
            if make is None:
                raise SchemaError(f"the simulated engine cannot generate the string format {fmt!r}")
            return make(self._rng.randrange(1000))
        low = int(schema.get("minLength", 0))
        high = int(schema.get("maxLength", max(low, 24)))
        if low > MAX_STRING_CHARS:
            raise SchemaError(f"minLength above {MAX_STRING_CHARS} is not supported")
        words = [self._rng.choice(_WORDS) for _ in range(self._rng.randint(1, 3))]
        text = " ".join(words)
        while len(text) < low:
            text += " " + self._rng.choice(_WORDS)
        return text[: max(high, 0)] if len(text) > high else text

    def _number(self, schema: Mapping[str, Any], *, integer: bool) -> int | float:
        lo, lo_open = _bound(schema, "minimum", "exclusiveMinimum", max)
        hi, hi_open = _bound(schema, "maximum", "exclusiveMaximum", min)
        if lo is None:
            lo = 0.0 if hi is None else hi - 1000.0
        if hi is None:
            hi = lo + 1000.0
        step = schema.get("multipleOf")
        if step is not None or integer:
            unit = float(step) if step is not None else 1.0
            first, last = math.ceil(lo / unit), math.floor(hi / unit)
            if lo_open and first * unit <= lo:
                first += 1
            if hi_open and last * unit >= hi:
                last -= 1
            if first > last:
                raise SchemaError("no number satisfies the schema's bounds")
            value = self._rng.randint(first, min(last, first + 1000)) * unit
            return int(value) if integer or (step is None or float(step).is_integer()) else value
        if lo > hi or (lo == hi and (lo_open or hi_open)):
            raise SchemaError("no number satisfies the schema's bounds")
        value = round(lo + (hi - lo) * self._rng.random(), 2)
        if value < lo or value > hi or (lo_open and value <= lo) or (hi_open and value >= hi):
            value = (lo + hi) / 2
        return value

    def _any_scalar(self) -> Any:
        return self._rng.choice([self._rng.choice(_WORDS), self._rng.randint(0, 99), True, None])
