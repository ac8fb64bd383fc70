"""Reserved endpoints: dedicated replicas rented by one workspace at an hourly price, prepaid.

It owns an endpoint's life on this core (replicas from the capacity pool, engines of its own,
suspension and resumption), its billing, and the lookup that routes a workspace's requests to
it. Billing is by periods (`core.reserved.period_s`, a minute by default): each period is held
from the workspace's balance and spend cap before it starts and charged, prepaid, as a journal
record numbered by period when it starts. So an endpoint is never billed for time it was not
serving, never twice for one period, and never beyond what its workspace has: when the next
period cannot be held, the endpoint is suspended (engines released) instead.

Everything here is synchronous on the event loop except starting and stopping engines, and
money moves only through the ledger. It never sees the wire, and it never hands an endpoint's
engine to any workspace but the owner's.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
from collections.abc import Callable, Coroutine
from typing import Any, Final

import msgspec

from corvex.quoting import quote
from corvex.ratecard import ModelRate, RateCard, ReservedOffering
from corvex_core import errors
from corvex_core.capacity import CapacityPool
from corvex_core.catalogue import Catalogue, Served
from corvex_core.config import EngineConfig, SimulatedEngineConfig
from corvex_core.engines.base import Engine, EngineState
from corvex_core.journal import JournalError
from corvex_core.ledger import MAX_REPLICAS, FixedHold, Ledger
from corvex_core.records import AutoReloadSet, CreditsAdded, Record, SpendCapSet, SuspendedBy
from corvex_core.state import Endpoint, EndpointStatus

log = logging.getLogger(__name__)

# An endpoint's name: what follows the workspace slug in its model id.
NAME_RULE: Final = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")
_SLUG_WORDS_CHARS: Final = 24
_SLUG_ID_CHARS: Final = 8
# A tick charges at most this many overdue periods of one endpoint (it falls behind only when
# the event loop stalled; the rest are charged by the next ticks).
MAX_PERIODS_PER_TICK: Final = 60
_RETRY_S: Final = 1.0

EngineFactory = Callable[[str, EngineConfig, int], Engine]


def workspace_slug(name: str, workspace_id: str) -> str:
    """The first part of a workspace's endpoint model ids: its name in lower-case ASCII words
    joined by `-` (at most 24 characters), then `-` and the first 8 hex digits of its id, so
    that it is stable, readable, and never a catalogue organisation by accident.

    workspace_slug("Acme, Inc.", "ws_bb343abbd17f2d46") == "acme-inc-bb343abb"; a name with no
    ASCII letter or digit gives "ws-bb343abb".
    """
    words = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    words = words[:_SLUG_WORDS_CHARS].strip("-")
    suffix = workspace_id.removeprefix("ws_")[:_SLUG_ID_CHARS]
    return f"{words or 'ws'}-{suffix}"


def check_name(name: str) -> None:
    if NAME_RULE.match(name) is None:
        raise errors.InvalidRequest(
            "An endpoint name is 1 to 40 of a-z, 0-9 and `-`, starting and ending with a letter "
            f"or digit, not {quote(name)}.",
            param="name",
        )


class Status(enum.StrEnum):
    """Where an endpoint is, as callers see it (the wire's EndpointStatus, lower-cased)."""

    STARTING = "starting"
    RUNNING = "running"
    SUSPENDED = "suspended"
    WAITING_FOR_CAPACITY = "waiting_for_capacity"
    FAILED = "failed"
    DELETED = "deleted"


class EndpointView(msgspec.Struct, frozen=True):
    """An endpoint with what this core knows of it now."""

    endpoint: Endpoint
    status: Status
    reason: str
    held_nano: int
    usd_per_replica_hour: str
    period_s: int
    engine_kind: str
    supports_embeddings: bool
    context_length: int
    card_path: str


class Phase(enum.Enum):
    IDLE = "idle"  # no engines, not billed: suspended, waiting for capacity, failed, unstarted
    STARTING = "starting"
    RUNNING = "running"


class Runtime:
    """An endpoint on this core: its replicas, engines and the hold of its next period."""

    def __init__(self, endpoint: Endpoint, offering: ReservedOffering, base: ModelRate) -> None:
        self.id = endpoint.id
        self.workspace_id = endpoint.workspace_id
        self.model_id = endpoint.model_id
        self.offering = offering
        self.base = base
        # Tokens through the endpoint cost nothing: its replica time is what is billed.
        self.rate = ModelRate(
            id=endpoint.model_id,
            name=endpoint.name,
            card_path=base.card_path,
            input_usd_per_million="0.00",
            output_usd_per_million="0.00",
            input_nano_per_token=0,
            output_nano_per_token=0,
            context_length=base.context_length,
            listed_unix_s=endpoint.created_ms // 1000,
        )
        self.phase = Phase.IDLE
        self.slots: list[int] = []
        self.engines: list[Engine] = []
        self.hold: FixedHold | None = None
        self.ready_ms = 0
        # Why the last hold was refused (None: it was not), why engines failed to start (no
        # retry until a resize), and whether the pool was short the last time it tried.
        self.refusal: errors.InsufficientCredits | None = None
        self.failure = ""
        self.capacity_short = False
        # Bumped whenever engines are started or stopped, so a late start finds it is stale.
        self.generation = 0
        self.settled = asyncio.Event()


class EndpointEngines:
    """What a core's reserved endpoints are, however they are billed: each one's replicas from
    the capacity pool, its engines (started, resized, stopped), its status as callers see it,
    and the engine a request to it runs on. `ReservedEndpoints` bills them from this core's
    journal; `corvex_core.reserved_cluster` from the cluster's PostgreSQL ledger."""

    def __init__(
        self,
        catalogue: Catalogue,
        pool: CapacityPool,
        *,
        period_s: int,
        engine_factory: EngineFactory,
        now_ms: Callable[[], int],
        accepting: Callable[[], bool] | None = None,
    ) -> None:
        assert 1 <= period_s <= 60 and 60 % period_s == 0
        self._catalogue = catalogue
        self._pool = pool
        self._period_s = period_s
        self._factory = engine_factory
        self._now_ms = now_ms
        self._accepting = accepting or (lambda: True)
        self._runtimes: dict[str, Runtime] = {}
        self._by_model: dict[tuple[str, str], Runtime] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()

    @property
    def period_s(self) -> int:
        return self._period_s

    @property
    def _period_ms(self) -> int:
        return self._period_s * 1000

    def capacity(self) -> list[tuple[ReservedOffering, int, int]]:
        """Every offering of the card with this core's total and free replicas."""
        pool = self._pool
        return [(o, pool.total(o.id), pool.free(o.id)) for o in self._catalogue.rate_card.reserved]

    async def wait_started(self, endpoint_id: str, timeout_s: float) -> None:
        """Returns once the endpoint's engines are ready (or failed), or after `timeout_s`."""
        runtime = self._runtimes.get(endpoint_id)
        if runtime is None or runtime.phase is not Phase.STARTING:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runtime.settled.wait(), timeout_s)

    # ---- engines ---------------------------------------------------------------------------

    def _start(self, runtime: Runtime) -> None:
        """Builds and starts an engine per slot; the endpoint runs once all are ready."""
        runtime.phase = Phase.STARTING
        runtime.generation += 1
        runtime.settled.clear()
        try:
            engines = [self._engine(runtime, slot) for slot in runtime.slots]
        except (ValueError, TypeError) as exc:
            self._failed(runtime, f"its engines cannot be built ({exc})")
            return
        runtime.engines = engines
        self._background(self._start_engines(runtime, runtime.generation, engines))

    def _resized(
        self, runtime: Runtime, added: list[int], delta: int, *, has_engines: bool
    ) -> None:
        """The engines follow a new replica count (`added` slots, or `-delta` fewer)."""
        if added:
            self._add_engines(runtime, added)
        elif delta < 0 and has_engines:
            self._remove_engines(runtime, -delta)
        if runtime.failure:
            runtime.failure = ""  # a resize is how an operator retries a failed start
            self._wake.set()

    def _engine(self, runtime: Runtime, slot: int) -> Engine:
        config = self._pool.engine_config(runtime.offering.id, slot)
        return self._factory(runtime.base.id, config, runtime.base.context_length)

    async def _start_engines(
        self, runtime: Runtime, generation: int, engines: list[Engine]
    ) -> None:
        try:
            await asyncio.gather(*(engine.start() for engine in engines))
        except Exception as exc:
            if runtime.generation == generation:
                log.error("reserved endpoint %s: engines failed to start: %s", runtime.id, exc)
                self._failed(runtime, f"its engines failed to start ({exc})")
            else:
                await _shutdown(engines)
            return
        if runtime.generation != generation:
            await _shutdown(engines)  # stopped while starting; shutdown is idempotent
            return
        # Replicas removed by a resize while they started: stopped again, now that they run.
        await _shutdown([e for e in engines if e not in runtime.engines])
        if runtime.generation != generation:
            return
        runtime.phase = Phase.RUNNING
        runtime.ready_ms = self._now_ms()
        log.info("reserved endpoint %s is running (%d replicas)", runtime.id, len(engines))
        try:
            await self._on_ready(runtime)
        finally:
            runtime.settled.set()

    def _add_engines(self, runtime: Runtime, slots: list[int]) -> None:
        engines = [self._engine(runtime, slot) for slot in slots]
        runtime.slots.extend(slots)
        runtime.engines.extend(engines)
        generation = runtime.generation

        async def start() -> None:
            try:
                await asyncio.gather(*(engine.start() for engine in engines))
            except Exception as exc:
                log.error("reserved endpoint %s: added replicas failed: %s", runtime.id, exc)
            if runtime.generation != generation:
                await _shutdown(engines)
            else:
                await _shutdown([e for e in engines if e not in runtime.engines])

        self._background(start())

    def _remove_engines(self, runtime: Runtime, count: int) -> None:
        assert 0 < count < len(runtime.slots)
        slots, engines = runtime.slots[-count:], runtime.engines[-count:]
        del runtime.slots[-count:], runtime.engines[-count:]
        self._background(self._stop_engines(runtime.offering.id, slots, engines))

    def _idle(self, runtime: Runtime) -> None:
        """No engines, no hold, nothing billed: after a suspension, a deletion or a failure."""
        self._drop_hold(runtime)
        runtime.phase = Phase.IDLE
        runtime.generation += 1
        runtime.ready_ms = 0
        runtime.settled.set()
        slots, engines = runtime.slots, runtime.engines
        runtime.slots, runtime.engines = [], []
        self._background(self._stop_engines(runtime.offering.id, slots, engines))

    def _failed(self, runtime: Runtime, reason: str) -> None:
        runtime.failure = reason
        self._idle(runtime)

    async def _stop_engines(
        self, offering_id: str, slots: list[int], engines: list[Engine]
    ) -> None:
        """Shuts the engines down (aborting what they run), then gives their slots back."""
        try:
            await _shutdown(engines)
        finally:
            self._pool.release(offering_id, slots)

    def _pick(self, runtime: Runtime) -> Engine:
        """The least loaded of the endpoint's ready replicas."""
        ready = [e for e in runtime.engines if e.state is EngineState.READY]
        if not ready:
            raise errors.EngineUnavailable(
                f"No replica of the reserved endpoint {quote(runtime.model_id)} is ready.",
                retry_after_s=_RETRY_S,
            )
        return min(ready, key=lambda e: e.stats().running + e.stats().waiting)

    def check_card(self, card: RateCard) -> None:
        """Raises ValueError if a new rate card would strand an endpoint: it drops an offering
        or a model one rents, or lists a model id one serves."""
        for runtime in self._runtimes.values():
            if runtime.offering.id not in card.offerings or card.get(runtime.base.id) is None:
                raise ValueError(
                    f"the card drops {runtime.offering.id} or {runtime.base.id}, which reserved "
                    f"endpoint {runtime.id} rents; delete the endpoint first"
                )
            if card.get(runtime.model_id) is not None:
                raise ValueError(
                    f"the card lists {runtime.model_id}, the model id of reserved endpoint "
                    f"{runtime.id}"
                )

    def engines(self) -> dict[str, list[Engine]]:
        """Each endpoint's engines (for health and tests)."""
        return {r.id: list(r.engines) for r in self._runtimes.values()}

    async def wait_background(self) -> None:
        """Returns once every engine start and stop begun so far has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _shutdown([e for r in self._runtimes.values() for e in r.engines])

    # ---- rules -----------------------------------------------------------------------------

    def _add(self, endpoint: Endpoint, offering: ReservedOffering) -> Runtime:
        base = self._catalogue.rate_card.get(endpoint.base_model)
        assert base is not None
        runtime = Runtime(endpoint, offering, base)
        self._runtimes[endpoint.id] = runtime
        self._by_model[(endpoint.workspace_id, endpoint.model_id)] = runtime
        return runtime

    def _acquire(self, offering: ReservedOffering, count: int) -> list[int]:
        slots = self._pool.acquire(offering.id, count)
        if slots is None:
            free, total = self._pool.free(offering.id), self._pool.total(offering.id)
            where = "is not offered on this core" if total == 0 else f"has {free} of {total} free"
            raise errors.CapacityUnavailable(
                f"The capacity pool of {offering.id} {where}; {count} more replicas cannot be "
                "rented now. Nothing was billed.",
                metadata={"offering": offering.id, "replicas_free": str(free)},
            )
        return slots

    def _per_period(self, runtime: Runtime) -> int:
        """One replica for one period at the card's current price (the card may have been
        reloaded; an offering in use never leaves it)."""
        offering = self._catalogue.rate_card.offerings.get(runtime.offering.id, runtime.offering)
        return offering.nano_per_replica_period(self._period_s)

    def _first_periods(self, offering: ReservedOffering) -> int:
        """Periods in an endpoint's first period: its minimum term, or one."""
        return max(1, offering.minimum_hours * 3600 // self._period_s)

    def _what(
        self, model_id: str, offering: ReservedOffering, replicas: int, periods: int, *, first: bool
    ) -> str:
        seconds = periods * self._period_s
        span = _span(seconds)
        which = "first" if first else "next"
        return (
            f"The {which} {span} of the reserved endpoint {quote(model_id)} ({replicas} "
            f"× {offering.id} at ${offering.usd_per_replica_hour} per replica-hour)"
        )

    def _suspended_error(self, runtime: Runtime, endpoint: Endpoint) -> errors.InsufficientCredits:
        refusal = runtime.refusal
        by_cap = (
            refusal.metadata.get("limit") == "spend_cap"
            if refusal is not None
            else endpoint.suspended_by is SuspendedBy.SPEND_CAP
        )
        detail = refusal.message if refusal is not None else "its next period could not be held."
        remedy = "Raise the monthly spend cap" if by_cap else "Top up"
        return errors.InsufficientCredits(
            f"The reserved endpoint {quote(runtime.model_id)} is suspended: {detail} "
            f"{remedy} and it resumes within seconds.",
            metadata={
                "limit": "spend_cap" if by_cap else "balance",
                "endpoint_id": runtime.id,
                "suspended": "true",
            },
        )

    def _status(self, endpoint: Endpoint, runtime: Runtime | None) -> tuple[Status, str]:
        if endpoint.status is EndpointStatus.DELETED or runtime is None:
            return Status.DELETED, ""
        if runtime.phase is Phase.RUNNING:
            return Status.RUNNING, ""
        if runtime.phase is Phase.STARTING:
            return Status.STARTING, "its replicas are starting."
        if runtime.failure:
            return Status.FAILED, f"{runtime.failure}; resize or delete it."
        if runtime.capacity_short:
            free = self._pool.free(runtime.offering.id)
            return Status.WAITING_FOR_CAPACITY, (
                f"the capacity pool of {runtime.offering.id} has {free} free replicas, fewer "
                f"than its {endpoint.replicas}; it starts when they free up."
            )
        if endpoint.status is EndpointStatus.SUSPENDED:
            refusal = runtime.refusal
            return Status.SUSPENDED, refusal.message if refusal else "its next period is unpaid."
        return Status.WAITING_FOR_CAPACITY, "it starts at the next billing tick."

    def _engine_kind(self, offering_id: str, runtime: Runtime | None) -> tuple[str, bool]:
        if runtime is not None and runtime.engines:
            engine = runtime.engines[0]
            return engine.kind, engine.supports_embeddings
        if self._pool.total(offering_id) == 0:
            return "", False
        config = self._pool.engine_config(offering_id, 0)
        if isinstance(config, SimulatedEngineConfig):
            return "simulated", True
        return "vllm", config.runner == "embed"

    def _view(
        self,
        endpoint: Endpoint,
        runtime: Runtime | None,
        status: Status,
        reason: str,
        held_nano: int,
    ) -> EndpointView:
        offering = self._catalogue.rate_card.offerings.get(endpoint.offering_id)
        base = self._catalogue.rate_card.get(endpoint.base_model)
        kind, embeds = self._engine_kind(endpoint.offering_id, runtime)
        price = offering or (runtime.offering if runtime else None)
        return EndpointView(
            endpoint=endpoint,
            status=status,
            reason=reason,
            held_nano=held_nano,
            usd_per_replica_hour=price.usd_per_replica_hour if price else "",
            period_s=self._period_s,
            engine_kind=kind,
            supports_embeddings=embeds,
            context_length=base.context_length if base else 0,
            card_path=base.card_path if base else "",
        )

    def _checked_new(
        self, workspace_name: str, workspace_id: str, offering_id: str, replicas: int, name: str
    ) -> tuple[ReservedOffering, str]:
        """The offering and the model id of a new endpoint, or InvalidRequest saying why not."""
        card = self._catalogue.rate_card
        offering = card.offerings.get(offering_id)
        if offering is None:
            raise errors.InvalidRequest(
                f"There is no reserved offering {quote(offering_id)}; "
                "ListReservedCapacity lists them.",
                param="offering",
            )
        check_replicas(replicas)
        check_name(name)
        model_id = f"{workspace_slug(workspace_name, workspace_id)}/{name}"
        if card.get(model_id) is not None:
            raise errors.InvalidRequest(
                f"{quote(model_id)} is a catalogue model id; choose another name.",
                param="name",
            )
        return offering, model_id

    def _background(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- what a way of billing adds ------------------------------------------------------

    def views(self, workspace_id: str | None = None) -> list[EndpointView]:
        """Endpoints not deleted, of one workspace or all, oldest first."""
        raise NotImplementedError

    def lookup(self, workspace_id: str, model_id: str) -> Served | None:
        """One of the workspace's own endpoint's replicas for `model_id`, or None when the
        workspace has no endpoint by that id (the shared fleet is then asked). Raises
        InsufficientCredits when it is suspended, EngineUnavailable when it is not serving."""
        raise NotImplementedError

    async def run(self, tick_s: float) -> None:
        """The billing loop; returns only when cancelled."""
        raise NotImplementedError

    def on_record(self, record: Record) -> None:
        """Sees every record the core's journal commits."""

    async def _on_ready(self, runtime: Runtime) -> None:
        """The endpoint's replicas are all ready (it is RUNNING): its period starts now."""
        raise NotImplementedError

    def _drop_hold(self, runtime: Runtime) -> None:
        """Gives back what is held for the endpoint's next period, if anything is."""

    def _served(self, runtime: Runtime) -> Served:
        return Served(
            runtime.rate,
            self._catalogue.rate_card.version,
            self._pick(runtime),
            endpoint_id=runtime.id,
            metric_model=f"reserved:{runtime.base.id}",
        )

    def _not_serving(self, runtime: Runtime, endpoint: Endpoint) -> errors.CorvexError:
        """Why a request to an endpoint that is not running is refused."""
        if endpoint.status is EndpointStatus.SUSPENDED and not runtime.capacity_short:
            return self._suspended_error(runtime, endpoint)
        _, reason = self._status(endpoint, runtime)
        return errors.EngineUnavailable(
            f"The reserved endpoint {quote(runtime.model_id)} is not serving yet: {reason}",
            retry_after_s=None if runtime.failure else _RETRY_S,
        )


class ReservedEndpoints(EndpointEngines):
    """Every reserved endpoint of a core with the journal ledger; see the module docstring."""

    def __init__(
        self,
        ledger: Ledger,
        catalogue: Catalogue,
        pool: CapacityPool,
        *,
        period_s: int,
        engine_factory: EngineFactory,
        after_charge: Callable[[str], None] | None = None,
        accepting: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(
            catalogue, pool, period_s=period_s, engine_factory=engine_factory,
            now_ms=ledger.now_ms, accepting=accepting,
        )  # fmt: skip
        self._ledger = ledger
        self._after_charge = after_charge or (lambda workspace_id: None)

    # ---- reads ---------------------------------------------------------------------------

    def find(self, endpoint_id: str) -> Endpoint | None:
        """The endpoint, deleted or not; None if there is none."""
        return self._ledger.state.endpoints.get(endpoint_id)

    def view(self, endpoint_id: str) -> EndpointView:
        endpoint = self._ledger.endpoint(endpoint_id)
        runtime = self._runtimes.get(endpoint_id)
        status, reason = self._status(endpoint, runtime)
        held = runtime.hold.amount_nano if runtime and runtime.hold else 0
        return self._view(endpoint, runtime, status, reason, held)

    def views(self, workspace_id: str | None = None) -> list[EndpointView]:
        """Endpoints not deleted, of one workspace or all, oldest first."""
        return [self.view(e.id) for e in self._ledger.endpoints(workspace_id)]

    def lookup(self, workspace_id: str, model_id: str) -> Served | None:
        """One of the workspace's own endpoint's replicas for `model_id`, or None when the
        workspace has no endpoint by that id (the shared fleet is then asked). Raises
        InsufficientCredits when it is suspended, EngineUnavailable when it is not serving."""
        runtime = self._by_model.get((workspace_id, model_id))
        if runtime is None:
            return None
        endpoint = self._ledger.endpoint(runtime.id)
        if runtime.phase is Phase.RUNNING:
            now = self._ledger.now_ms()
            if now >= endpoint.paid_until_ms and self._accepting():
                # The paid period is over and the tick has not come yet: the next period is
                # charged (or the endpoint suspended) now, so that every request is served
                # inside a period that is charged, and its charge is journaled before the
                # request's own.
                self._bill(runtime, now)
            if runtime.phase is Phase.RUNNING and now < endpoint.paid_until_ms:
                return self._served(runtime)
            raise self._suspended_error(runtime, endpoint)
        raise self._not_serving(runtime, endpoint)

    # ---- changes ---------------------------------------------------------------------------

    def create(self, workspace_id: str, offering_id: str, replicas: int, name: str) -> EndpointView:
        """Rents an endpoint: takes its replicas from the pool and holds its first period
        (raising, with nothing created or billed, if either cannot be had), then starts its
        engines. The first period is charged when they are ready."""
        ws = self._ledger.workspace(workspace_id)
        card = self._catalogue.rate_card
        offering, model_id = self._checked_new(ws.name, ws.id, offering_id, replicas, name)
        slots = self._acquire(offering, replicas)
        per_period = offering.nano_per_replica_period(self._period_s)
        periods = self._first_periods(offering)
        try:
            endpoint, hold = self._ledger.create_endpoint(
                workspace_id,
                name=name,
                model_id=model_id,
                offering_id=offering.id,
                base_model=offering.model,
                replicas=replicas,
                hold_nano=replicas * per_period * periods,
                hold_periods=periods,
                rate_card_version=card.version,
                what=self._what(model_id, offering, replicas, periods, first=True),
            )
        except Exception:
            self._pool.release(offering.id, slots)
            raise
        runtime = self._add(endpoint, offering)
        runtime.hold, runtime.slots = hold, slots
        self._start(runtime)
        log.info(
            "reserved endpoint %s created for %s: %d x %s",
            endpoint.id,
            workspace_id,
            replicas,
            offering.id,
        )
        return self.view(endpoint.id)

    def resize(self, endpoint_id: str, replicas: int) -> EndpointView:
        """A new replica count: added replicas need free capacity and are billed for what is
        left of the current period (whole accrual periods, rounded up); removed ones stop at
        once. The held next period follows the new count."""
        runtime = self._live(endpoint_id)
        check_replicas(replicas)
        endpoint = self._ledger.endpoint(endpoint_id)
        delta = replicas - endpoint.replicas
        if delta == 0:
            return self.view(endpoint_id)
        has_engines = runtime.phase is not Phase.IDLE
        added = self._acquire(runtime.offering, delta) if delta > 0 and has_engines else []
        per_period = self._per_period(runtime)
        now = self._ledger.now_ms()
        remaining = 0
        if delta > 0 and runtime.phase is Phase.RUNNING and endpoint.paid_until_ms > now:
            remaining = -(-(endpoint.paid_until_ms - now) // self._period_ms)
        old, runtime.hold = runtime.hold, None
        try:
            runtime.hold = self._ledger.resize_endpoint(
                endpoint_id,
                replicas,
                charge_nano=max(delta, 0) * per_period * remaining,
                charged_replica_s=max(delta, 0) * remaining * self._period_s,
                hold=old,
                what=(
                    f"Resizing the reserved endpoint {quote(runtime.model_id)} to "
                    f"{replicas} replicas (the added ones for the rest of this period, and the "
                    "next period held)"
                ),
            )
        except Exception:
            if added:
                self._pool.release(runtime.offering.id, added)
            if old is not None and not old.resolved:
                runtime.hold = old
            raise
        self._resized(runtime, added, delta, has_engines=has_engines)
        return self.view(endpoint_id)

    def delete(self, endpoint_id: str) -> EndpointView:
        """Stops the endpoint's billing and engines at once; the started period is not refunded."""
        endpoint = self._ledger.endpoint(endpoint_id)
        if endpoint.status is EndpointStatus.DELETED:
            return self.view(endpoint_id)
        self._ledger.delete_endpoint(endpoint_id)
        runtime = self._runtimes.pop(endpoint_id, None)
        if runtime is not None:
            del self._by_model[(runtime.workspace_id, runtime.model_id)]
            self._idle(runtime)
        log.info("reserved endpoint %s deleted", endpoint_id)
        return self.view(endpoint_id)

    # ---- billing ---------------------------------------------------------------------------

    def tick(self) -> None:
        """Bills what is due, suspends what cannot be held, resumes what now can: one pass over
        every endpoint, synchronous. Does nothing unless the core is serving."""
        if not self._accepting():
            return
        now = self._ledger.now_ms()
        for runtime in list(self._runtimes.values()):
            try:
                self._bill(runtime, now)
            except JournalError as exc:
                # The journal refused (full disk, or far behind): nothing was changed for this
                # endpoint; the next tick tries again, or the core stops serving.
                log.warning("reserved billing paused: %s", exc)
                return

    async def run(self, tick_s: float) -> None:
        """The billing loop: a tick every `tick_s`, or at once when a top-up or a cap change
        may let a suspended endpoint resume."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), tick_s)
            self._wake.clear()
            try:
                self.tick()
            except Exception:
                # A bug, never a user's error: said loudly, and the next tick tries again (every
                # change asserts its invariants before it is applied).
                log.exception("reserved billing tick failed")

    def on_record(self, record: Record) -> None:
        """Sees every committed record: money that arrives wakes the billing loop."""
        if isinstance(record, CreditsAdded | SpendCapSet | AutoReloadSet) and any(
            r.workspace_id == record.workspace_id and (r.refusal or r.phase is Phase.IDLE)
            for r in self._runtimes.values()
        ):
            self._wake.set()

    def _bill(self, runtime: Runtime, now: int) -> None:
        if runtime.failure or runtime.phase is Phase.STARTING:
            return
        endpoint = self._ledger.endpoint(runtime.id)
        if runtime.phase is Phase.IDLE:
            self._try_start(runtime, endpoint, now)
            return
        for _ in range(MAX_PERIODS_PER_TICK):
            if now < endpoint.paid_until_ms:
                break
            if runtime.hold is None:
                runtime.hold = self._hold(runtime, endpoint)
                if runtime.hold is None:
                    self._suspend(runtime, endpoint)
                    return
            hold, runtime.hold = runtime.hold, None
            start = max(endpoint.paid_until_ms, runtime.ready_ms)
            self._ledger.charge_period(hold, start_ms=start, period_ms=self._period_ms)
            self._after_charge(runtime.workspace_id)
        if runtime.hold is None and now < endpoint.paid_until_ms:
            # The next period, held now: a refusal is remembered, and suspends the endpoint
            # when this period ends unless money arrives first.
            runtime.hold = self._hold(runtime, endpoint)

    def _try_start(self, runtime: Runtime, endpoint: Endpoint, now: int) -> None:
        """Starts an endpoint without engines: a suspended one whose next period can be held
        now (it resumes), or an active one (after a restart) once the pool has room."""
        resuming = endpoint.status is EndpointStatus.SUSPENDED
        hold = None
        if resuming or now >= endpoint.paid_until_ms:
            hold = self._hold(runtime, endpoint)
            if hold is None:
                if not resuming:
                    self._suspend(runtime, endpoint)
                return
        slots = self._pool.acquire(runtime.offering.id, endpoint.replicas)
        runtime.capacity_short = slots is None
        if slots is None:
            if hold is not None:
                self._ledger.release_fixed(hold)
            return
        try:
            if resuming:
                self._ledger.resume_endpoint(endpoint.id)
                log.info("reserved endpoint %s resumed", endpoint.id)
        except Exception:
            self._pool.release(runtime.offering.id, slots)
            if hold is not None:
                self._ledger.release_fixed(hold)
            raise
        runtime.hold, runtime.slots = hold, slots
        self._start(runtime)

    def _hold(self, runtime: Runtime, endpoint: Endpoint) -> FixedHold | None:
        """Holds the endpoint's next period (the minimum term if none was billed yet), or
        remembers why it cannot be held and returns None."""
        periods = self._first_periods(runtime.offering) if endpoint.period == 0 else 1
        per_period = self._per_period(runtime)
        try:
            hold = self._ledger.hold_fixed(
                endpoint,
                endpoint.replicas * per_period * periods,
                periods=periods,
                replicas=endpoint.replicas,
                rate_card_version=self._catalogue.rate_card.version,
                what=self._what(
                    runtime.model_id,
                    runtime.offering,
                    endpoint.replicas,
                    periods,
                    first=endpoint.period == 0,
                ),
            )
        except errors.InsufficientCredits as refusal:
            runtime.refusal = refusal
            self._after_charge(runtime.workspace_id)  # auto-reload, if the workspace has it
            return None
        runtime.refusal = None
        return hold

    def _suspend(self, runtime: Runtime, endpoint: Endpoint) -> None:
        assert runtime.refusal is not None
        by_cap = runtime.refusal.metadata.get("limit") == "spend_cap"
        self._ledger.suspend_endpoint(
            endpoint.id, SuspendedBy.SPEND_CAP if by_cap else SuspendedBy.BALANCE
        )
        log.warning("reserved endpoint %s suspended: %s", endpoint.id, runtime.refusal.message)
        self._idle(runtime)

    # ---- life ------------------------------------------------------------------------------

    def recover(self) -> None:
        """After the ledger's recovery: every endpoint not deleted gets its runtime back (the
        billing loop starts it). Whatever was held died with the old process; periods already
        charged stay charged, and the next one starts when the replicas are ready again."""
        card = self._catalogue.rate_card
        for endpoint in self._ledger.endpoints():
            offering = card.offerings.get(endpoint.offering_id)
            base = card.get(endpoint.base_model)
            if offering is None or base is None:
                raise ValueError(
                    f"reserved endpoint {endpoint.id} rents {endpoint.offering_id} "
                    f"({endpoint.base_model}), which the rate card no longer lists; put it back "
                    "on the card or restore the old card"
                )
            self._add(endpoint, offering)
        if self._runtimes:
            log.info("%d reserved endpoints recovered", len(self._runtimes))

    def _live(self, endpoint_id: str) -> Runtime:
        runtime = self._runtimes.get(endpoint_id)
        if runtime is None:
            self._ledger.endpoint(endpoint_id)  # NotFound for an unknown id
            raise errors.InvalidRequest(
                f"The reserved endpoint {quote(endpoint_id)} is deleted.",
                param="endpoint_id",
            )
        return runtime

    async def _on_ready(self, runtime: Runtime) -> None:
        if self._accepting():
            try:
                self._bill(runtime, runtime.ready_ms)  # its period starts now
            except JournalError as exc:
                log.warning("reserved billing paused: %s", exc)

    def _drop_hold(self, runtime: Runtime) -> None:
        if runtime.hold is not None:
            self._ledger.release_fixed(runtime.hold)
            runtime.hold = None


def check_replicas(replicas: int) -> None:
    if not 1 <= replicas <= MAX_REPLICAS:
        raise errors.InvalidRequest(f"replicas must be from 1 to {MAX_REPLICAS}", param="replicas")


def _span(seconds: int) -> str:
    if seconds % 3600 == 0:
        hours = seconds // 3600
        return "hour" if hours == 1 else f"{hours} hours"
    if seconds % 60 == 0:
        minutes = seconds // 60
        return "minute" if minutes == 1 else f"{minutes} minutes"
    return "second" if seconds == 1 else f"{seconds} seconds"


async def _shutdown(engines: list[Engine]) -> None:
    await asyncio.gather(*(engine.shutdown() for engine in engines), return_exceptions=True)
