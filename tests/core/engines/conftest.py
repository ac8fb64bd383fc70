"""Fixtures of the engine tests: the fake vllm package, importable as `vllm` for one test."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

FAKES = Path(__file__).resolve().parents[2] / "fakes"


def _vllm_modules() -> list[str]:
    return [name for name in sys.modules if name == "vllm" or name.startswith("vllm.")]


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The fake vllm package, importable as `vllm` for this test only."""
    for name in _vllm_modules():
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    monkeypatch.syspath_prepend(str(FAKES))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    fake = importlib.import_module("vllm._fake")
    assert importlib.import_module("vllm").CORVEX_FAKE
    yield fake
    for name in _vllm_modules():
        del sys.modules[name]
