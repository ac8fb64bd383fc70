"""The capacity pool of reserved endpoints: which dedicated replicas of each offering this core
can run at once, and which of them are rented.

It owns the pool's slots, built and checked from `core.reserved.pools` against the rate card
and the shared engines' GPUs (a vLLM slot is a set of GPUs no shared engine and no other slot
uses), and who holds them. It starts no engine and knows no money.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

import msgspec

from corvex.ratecard import RateCard
from corvex_core.config import CoreConfig, EngineConfig, SimulatedEngineConfig, VllmEngineConfig

# Slots of one offering (TigerStyle: a limit on everything; far beyond any node).
MAX_SLOTS: Final = 1024


class CapacityError(ValueError):
    """The pool's configuration does not fit the rate card or the engines; the message says why."""


class _Pool:
    def __init__(self, offering_id: str, engines: list[EngineConfig]) -> None:
        assert len(engines) <= MAX_SLOTS
        self.offering_id = offering_id
        self.engines = engines
        self.free = set(range(len(engines)))


class CapacityPool:
    """Slots per offering. `acquire` and `release` are synchronous and all-or-nothing."""

    def __init__(self, slots: Mapping[str, list[EngineConfig]]) -> None:
        self._pools = {
            offering: _Pool(offering, list(engines)) for offering, engines in slots.items()
        }

    @classmethod
    def from_config(cls, config: CoreConfig, card: RateCard) -> CapacityPool:
        """The pool of `config.reserved`, checked against the card and the shared engines."""
        reserved = config.reserved
        if not (1 <= reserved.period_s <= 60 and 60 % reserved.period_s == 0):
            raise CapacityError(
                f"core.reserved.period_s must divide 60 (the rate card accrues by the minute), "
                f"not {reserved.period_s}"
            )
        if not 0 < reserved.tick_s <= reserved.period_s:
            raise CapacityError("core.reserved.tick_s must be above 0 and at most period_s")
        if not 0 <= reserved.create_wait_s <= 600:
            raise CapacityError("core.reserved.create_wait_s must be from 0 to 600")
        used = _shared_devices(config)
        slots: dict[str, list[EngineConfig]] = {}
        for offering_id, pool in reserved.pools.items():
            where = f"core.reserved.pools.{offering_id}"
            offering = card.offerings.get(offering_id)
            if offering is None:
                raise CapacityError(
                    f"{where}: the rate card has no reserved offering {offering_id}"
                )
            try:
                offering.nano_per_replica_period(reserved.period_s)
            except ValueError as exc:
                raise CapacityError(f"{where}: {exc}; choose another period_s") from None
            engine = pool.engine or config.engines.for_model(offering.model)
            if engine is None:
                raise CapacityError(f"{where}: no engine for {offering.model}; give `engine`")
            slots[offering_id] = _slots(where, engine, pool.replicas, pool.devices,
                                        offering.gpus_per_replica, used)  # fmt: skip
        return cls(slots)

    def offerings(self) -> list[str]:
        return list(self._pools)

    def total(self, offering_id: str) -> int:
        pool = self._pools.get(offering_id)
        return len(pool.engines) if pool is not None else 0

    def free(self, offering_id: str) -> int:
        pool = self._pools.get(offering_id)
        return len(pool.free) if pool is not None else 0

    def acquire(self, offering_id: str, count: int) -> list[int] | None:
        """`count` free slots of the offering (the lowest numbers), or None if it has fewer."""
        assert count >= 1
        pool = self._pools.get(offering_id)
        if pool is None or len(pool.free) < count:
            return None
        taken = sorted(pool.free)[:count]
        pool.free.difference_update(taken)
        return taken

    def release(self, offering_id: str, slots: Iterable[int]) -> None:
        pool = self._pools[offering_id]
        for slot in slots:
            assert 0 <= slot < len(pool.engines) and slot not in pool.free, "slot released twice"
            pool.free.add(slot)

    def engine_config(self, offering_id: str, slot: int) -> EngineConfig:
        """What the replica in this slot runs (a vLLM engine on the slot's own GPUs)."""
        return self._pools[offering_id].engines[slot]

    def check_card(self, card: RateCard) -> None:
        """Raises CapacityError if `card` drops an offering this pool serves."""
        gone = [offering for offering in self._pools if offering not in card.offerings]
        if gone:
            raise CapacityError(
                f"the card drops reserved offerings core.reserved.pools has: {', '.join(gone)}"
            )


def _shared_devices(config: CoreConfig) -> set[int]:
    """GPUs the shared engines use (vLLM engines with explicit devices)."""
    engines = [config.engines.default, *config.engines.models.values()]
    devices: set[int] = set()
    for engine in engines:
        if isinstance(engine, VllmEngineConfig) and engine.devices is not None:
            devices.update(engine.devices)
    return devices


def _slots(
    where: str,
    engine: EngineConfig,
    replicas: int,
    devices: list[list[int]] | None,
    gpus_per_replica: int,
    used: set[int],
) -> list[EngineConfig]:
    """One engine config per slot; GPUs of vLLM slots are checked and added to `used`."""
    if isinstance(engine, SimulatedEngineConfig):
        if devices is not None:
            raise CapacityError(f"{where}: `devices` are for vLLM pools; give `replicas`")
        if not 0 <= replicas <= MAX_SLOTS:
            raise CapacityError(f"{where}: replicas must be from 0 to {MAX_SLOTS}")
        return [engine] * replicas
    if devices is None:
        raise CapacityError(f"{where}: a vLLM pool lists the GPUs of each replica in `devices`")
    if replicas not in (0, len(devices)) or len(devices) > MAX_SLOTS:
        raise CapacityError(f"{where}: replicas must be the number of device lists, or omitted")
    slots: list[EngineConfig] = []
    for index, gpus in enumerate(devices):
        if len(gpus) != gpus_per_replica or len(set(gpus)) != len(gpus):
            raise CapacityError(
                f"{where}.devices[{index}]: a replica of this offering has {gpus_per_replica} "
                f"distinct GPUs, not {gpus}"
            )
        taken = used.intersection(gpus)
        if taken:
            raise CapacityError(
                f"{where}.devices[{index}]: GPUs {sorted(taken)} are already used by a shared "
                "engine or another replica"
            )
        used.update(gpus)
        slots.append(msgspec.structs.replace(engine, devices=list(gpus)))
    return slots
