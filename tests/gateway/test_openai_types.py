"""The edge's request types against the parameter table behind docs/api.md: every parameter the
table says is served is a field the edge decodes and forwards, every refused one is seen (and
refused) by name, and the edge declares nothing the table does not list."""

from __future__ import annotations

import msgspec
import pytest

from corvex.api_params import PARAMETERS, Endpoint, Status
from corvex_core.engines.base import MAX_TOP_LOGPROBS
from gateway.openai_types import (
    CHAT_REQUEST,
    COMPLETION_REQUEST,
    EMBEDDING_REQUEST,
    MAX_LOGPROBS,
)

DECODED = {
    Endpoint.CHAT: CHAT_REQUEST,
    Endpoint.COMPLETIONS: COMPLETION_REQUEST,
    Endpoint.EMBEDDINGS: EMBEDDING_REQUEST,
}
# Rows of the table that are not top-level fields.
NOT_FIELDS = {"messages[].name", "messages[].tool_calls / role tool"}


@pytest.mark.parametrize("endpoint", list(Endpoint))
def test_the_decoded_fields_are_the_tables_served_and_refused_parameters(
    endpoint: Endpoint,
) -> None:
    fields = {f.name for f in msgspec.structs.fields(DECODED[endpoint])}
    rows = {p.name: p.status for p in PARAMETERS[endpoint]}
    wanted = {n for n, s in rows.items() if s is not Status.IGNORED} - NOT_FIELDS
    assert wanted <= fields, f"served or refused but not decoded: {sorted(wanted - fields)}"
    ignored_fields = {n for n, s in rows.items() if s is Status.IGNORED} & fields
    assert ignored_fields <= {"user"}  # forwarded for the usage record, changes no answer
    assert fields <= set(rows), f"decoded but not in docs/api.md: {sorted(fields - set(rows))}"


def test_the_edges_logprobs_bound_is_the_engines() -> None:
    assert MAX_LOGPROBS == MAX_TOP_LOGPROBS
