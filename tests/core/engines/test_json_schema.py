"""The instance generator against jsonschema, on schemas hypothesis builds from the subset
OpenAI's strict mode allows, and the schema checks' bounds."""

from __future__ import annotations

import random
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corvex_core.engines.json_schema import (
    MAX_SCHEMA_NODES,
    SchemaError,
    check_schema,
    generate_instance,
)

NAMES = st.text(alphabet="abcdefghij_", min_size=1, max_size=6)


def _numbers(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": kind}
        low = draw(st.none() | st.integers(-50, 50))
        if low is not None:
            schema[draw(st.sampled_from(["minimum", "exclusiveMinimum"]))] = low
            schema[draw(st.sampled_from(["maximum", "exclusiveMaximum"]))] = low + draw(
                st.integers(2, 100)
            )
        if kind == "integer" and draw(st.booleans()):
            schema["multipleOf"] = draw(st.integers(1, 3))
            schema.pop("exclusiveMaximum", None)
            schema.pop("maximum", None)
        return schema

    return build()


SCALARS = st.one_of(
    st.just({"type": "string"}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(lambda v: {"type": "string", "enum": v}, st.lists(NAMES, min_size=1, max_size=4)),
    st.builds(lambda v: {"const": v}, NAMES | st.integers()),
    st.sampled_from(
        [{"type": "string", "format": f} for f in ("date-time", "date", "email", "uuid")]
    ),
    _numbers("integer"),
    _numbers("number"),
)


def _containers(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    objects = st.dictionaries(NAMES, children, min_size=1, max_size=4).map(
        lambda props: {
            "type": "object",
            "properties": props,
            "required": sorted(props),
            "additionalProperties": False,
        }
    )
    arrays = st.builds(
        lambda items, low, extra: {
            "type": "array",
            "items": items,
            "minItems": low,
            "maxItems": low + extra,
        },
        children,
        st.integers(0, 2),
        st.integers(0, 2),
    )
    unions = st.lists(children, min_size=1, max_size=3).map(lambda options: {"anyOf": options})
    return st.one_of(objects, arrays, unions)


STRICT_SCHEMAS = st.recursive(SCALARS, _containers, max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(schema=STRICT_SCHEMAS, seed=st.integers(0, 2**32))
def test_generated_instances_are_valid_for_generated_schemas(
    schema: dict[str, Any], seed: int
) -> None:
    check_schema(schema)
    value = generate_instance(schema, random.Random(seed))
    jsonschema.validate(
        value, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_recursive_definitions_end(seed: int) -> None:
    schema = {
        "$defs": {
            "expr": {
                "anyOf": [
                    {"type": "integer"},
                    {
                        "type": "object",
                        "properties": {
                            "op": {"enum": ["+", "*"]},
                            "args": {
                                "type": "array",
                                "items": {"$ref": "#/$defs/expr"},
                                "minItems": 2,
                                "maxItems": 2,
                            },
                        },
                        "required": ["op", "args"],
                        "additionalProperties": False,
                    },
                ]
            }
        },
        "$ref": "#/$defs/expr",
    }
    jsonschema.validate(generate_instance(schema, random.Random(seed)), schema)


def test_the_same_seed_gives_the_same_instance() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "number"}}}
    assert generate_instance(schema, random.Random(4)) == generate_instance(
        schema, random.Random(4)
    )


@pytest.mark.parametrize(
    "schema",
    [
        [],
        {"type": 3},
        {"required": "a"},
        {
            "properties": {
                f"p{i}": {"type": "object", "properties": {}} for i in range(MAX_SCHEMA_NODES)
            }
        },
    ],
)
def test_invalid_or_oversized_schemas_are_refused(schema: Any) -> None:
    with pytest.raises(SchemaError):
        check_schema(schema)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "pattern": "^x$"},
        {"not": {"type": "string"}},
        {"allOf": [{"type": "string"}, {"minLength": 2}]},
        {"type": "array", "minItems": 1000},
        {"$ref": "https://example.com/schema.json"},
        {"type": "object", "properties": {"self": {"$ref": "#"}}, "required": ["self"]},
        False,
    ],
)
def test_what_the_generator_cannot_do_is_a_schema_error(schema: Any) -> None:
    with pytest.raises(SchemaError):
        generate_instance(schema, random.Random(0))
