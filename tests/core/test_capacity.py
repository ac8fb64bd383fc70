"""The capacity pool: built from core.reserved.pools and checked against the rate card and the
shared engines' GPUs, and all-or-nothing when replicas are taken and given back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from corvex.ratecard import load_rate_card
from corvex_core.capacity import CapacityError, CapacityPool
from corvex_core.config import CoreConfig, SimulatedEngineConfig, VllmEngineConfig

CARD = load_rate_card(Path("infrastructure/metronome/config.yaml"))
GLM = "glm-5.1-fp8-8gpu"  # 8 GPUs per replica


def config(reserved: dict[str, Any], engines: dict[str, Any] | None = None) -> CoreConfig:
    return msgspec.convert(
        {"reserved": reserved, **({"engines": engines} if engines else {})}, CoreConfig
    )


def vllm(**fields: Any) -> dict[str, Any]:
    return {"backend": "vllm", "model": "/weights/glm", "tensor_parallel_size": 8, **fields}


def test_a_simulated_pool_and_its_slots() -> None:
    pool = CapacityPool.from_config(
        config({"pools": {"deepseek-v4-flash-1gpu": {"replicas": 3}}}), CARD
    )
    assert pool.total("deepseek-v4-flash-1gpu") == 3 and pool.total(GLM) == 0
    assert pool.acquire("deepseek-v4-flash-1gpu", 2) == [0, 1]
    assert pool.acquire("deepseek-v4-flash-1gpu", 2) is None  # all or nothing
    assert pool.free("deepseek-v4-flash-1gpu") == 1
    pool.release("deepseek-v4-flash-1gpu", [0])
    assert pool.acquire("deepseek-v4-flash-1gpu", 2) == [0, 2]
    assert isinstance(pool.engine_config("deepseek-v4-flash-1gpu", 0), SimulatedEngineConfig)
    with pytest.raises(AssertionError, match="released twice"):
        pool.release("deepseek-v4-flash-1gpu", [1, 1])


def test_a_vllm_pool_runs_each_replica_on_its_own_gpus() -> None:
    devices = [list(range(8)), list(range(8, 16))]
    pool = CapacityPool.from_config(
        config({"pools": {GLM: {"devices": devices, "engine": vllm()}}}), CARD
    )
    assert pool.total(GLM) == 2
    slots = [pool.engine_config(GLM, i) for i in range(2)]
    assert all(isinstance(s, VllmEngineConfig) for s in slots)
    assert [s.devices for s in slots if isinstance(s, VllmEngineConfig)] == devices


@pytest.mark.parametrize(
    ("reserved", "engines", "words"),
    [
        ({"pools": {"nope": {"replicas": 1}}}, None, "no reserved offering nope"),
        ({"period_s": 7, "pools": {}}, None, "period_s must divide 60"),
        ({"tick_s": 0, "pools": {}}, None, "tick_s"),
        ({"pools": {GLM: {"engine": vllm()}}}, None, "lists the GPUs of each replica"),
        ({"pools": {GLM: {"devices": [[0, 1]], "engine": vllm()}}}, None, "8 distinct GPUs"),
        (
            {"pools": {GLM: {"devices": [list(range(8)), list(range(4, 12))], "engine": vllm()}}},
            None,
            "already used",
        ),
        (
            {"pools": {GLM: {"devices": [list(range(8))], "engine": vllm()}}},
            {"default": vllm(devices=[0])},
            "already used by a shared engine",
        ),
        ({"pools": {GLM: {"devices": [list(range(8))]}}}, None, "are for vLLM pools"),
        ({"pools": {GLM: {"replicas": 1}}}, {"default": None}, "no engine for zai-org/GLM"),
    ],
)
def test_a_pool_that_does_not_fit_is_refused(
    reserved: dict[str, Any], engines: dict[str, Any] | None, words: str
) -> None:
    with pytest.raises(CapacityError, match=words):
        CapacityPool.from_config(config(reserved, engines), CARD)


def test_a_period_that_does_not_split_a_price_is_refused() -> None:
    # $2.49 an hour is a whole number of nano-USD per minute, not per second.
    flash = CARD.offerings["deepseek-v4-flash-1gpu"]
    cheaper = msgspec.structs.replace(flash, nano_per_replica_hour=2_490_000_000)
    cheap = msgspec.structs.replace(CARD, offerings={**CARD.offerings, flash.id: cheaper})
    reserved = {"period_s": 1, "pools": {"deepseek-v4-flash-1gpu": {"replicas": 1}}}
    with pytest.raises(CapacityError, match="per 1 s; choose another period_s"):
        CapacityPool.from_config(config(reserved), cheap)


def test_a_card_that_drops_a_pooled_offering_is_refused() -> None:
    pool = CapacityPool.from_config(config({"pools": {GLM: {"replicas": 1}}}), CARD)
    pool.check_card(CARD)
    without = msgspec.structs.replace(CARD, offerings={})
    with pytest.raises(CapacityError, match=GLM):
        pool.check_card(without)
