"""docs/api.md is generated from corvex/api_params.py, and the table covers the engine seam."""

from __future__ import annotations

from pathlib import Path

import msgspec

from corvex.api_params import PARAMETERS, Endpoint, Status, is_default, param, refused, render
from corvex_core.engines.base import ChatContext, SamplingOptions

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_the_page_is_the_table() -> None:
    assert DOC.read_text() == render(), "run: python -m corvex.api_params > docs/api.md"


def test_each_parameter_is_listed_once_per_endpoint() -> None:
    for params in PARAMETERS.values():
        names = [p.name for p in params]
        assert len(names) == len(set(names))


def test_what_the_engines_serve_is_not_refused() -> None:
    served = {
        p.name for params in PARAMETERS.values() for p in params if p.status is Status.IMPLEMENTED
    }
    options = {f.name for f in msgspec.structs.fields(SamplingOptions)} - {"max_tokens"}
    assert options <= served
    assert "stream" in served
    renamed = {"template_kwargs": "chat_template_kwargs"}
    context = {renamed.get(f.name, f.name) for f in msgspec.structs.fields(ChatContext)}
    assert context <= served
    assert "tools" not in refused(Endpoint.CHAT) and "suffix" in refused(Endpoint.COMPLETIONS)


def test_a_refused_parameter_passes_with_the_value_that_asks_for_nothing() -> None:
    store = param(Endpoint.CHAT, "store")
    assert is_default(store, None) and is_default(store, False)
    assert not is_default(store, True) and not is_default(store, 0)
    priority = param(Endpoint.COMPLETIONS, "priority")
    assert is_default(priority, 0) and not is_default(priority, False)
    assert not is_default(param(Endpoint.CHAT, "functions"), [])
