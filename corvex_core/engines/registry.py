"""Builds the engine a model's configuration names. The only place that picks a backend."""

from __future__ import annotations

from corvex_core.config import EngineConfig, SimulatedEngineConfig, VllmEngineConfig
from corvex_core.engines.base import Engine
from corvex_core.engines.simulated import SimulatedEngine


def build_engine(model_id: str, config: EngineConfig, *, context_length: int) -> Engine:
    """An engine for `model_id`, not yet started."""
    if isinstance(config, SimulatedEngineConfig):
        return SimulatedEngine(model_id, config)
    if isinstance(config, VllmEngineConfig):
        # Imported here so that a core without GPUs never imports vllm.
        from corvex_core.engines.vllm import VllmEngine

        return VllmEngine(model_id, config, context_length=context_length)
    raise TypeError(f"unknown engine config {type(config).__name__}")
