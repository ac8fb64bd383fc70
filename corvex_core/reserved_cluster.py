"""Reserved endpoints in a cluster: each runs on its home core's capacity pool and is billed by
that core straight in PostgreSQL (pg/endpoints.py); every core knows every endpoint.

An endpoint is created on the core the call reaches (its replicas come from that core's pool)
and stays there: only its home core starts its engines, serves it and bills it. Any core lists
it, shows it and deletes it (the charge of a period refuses a deleted endpoint, so billing
stops at once; the home core stops the replicas when it hears). A resize needs the home core's
pool, so another core refuses it naming the core to ask. A request for an endpoint that runs
elsewhere is refused before admission with UNAVAILABLE naming the home core, which the edge
follows (gateway/routing.py): nothing ran, nothing was billed.

Billing: each period is charged when it starts, in one transaction, from the balance no lease
holds (what the single core holds ahead in memory, a cluster charges at the start). When the
charge is refused the endpoint is suspended (replicas released) until a charge fits again;
when the ledger cannot be reached, the endpoint goes on serving for `GRACE_MS` past its paid
time (unbilled: never billed for what was not charged) and then refuses until it is back. A
home core that dies stops serving and billing its endpoints; restarted (it keeps its id in its
data directory), it starts them again, and their next period starts when they are ready.

Everything here runs on the event loop; changes on this core are serialised by one lock, so a
reload of the endpoints never overtakes a change this core made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Final

from corvex.quoting import quote
from corvex_core import errors
from corvex_core.capacity import CapacityPool
from corvex_core.catalogue import Catalogue, Served
from corvex_core.ledger import MAX_ENDPOINTS_PER_WORKSPACE
from corvex_core.pg import db
from corvex_core.pg.endpoints import EndpointGone, EndpointRow, EndpointStore
from corvex_core.records import SuspendedBy
from corvex_core.reserved import (
    EndpointEngines,
    EndpointView,
    EngineFactory,
    Phase,
    Runtime,
    Status,
    check_replicas,
)
from corvex_core.state import Endpoint, EndpointStatus

log = logging.getLogger(__name__)

# How long past its paid time an endpoint whose next charge has not committed (the ledger is
# slow or away) still serves. Those moments are not billed.
GRACE_MS: Final = 5_000
# Every core reads every endpoint at a notice of a change, and this often without one (a notice
# is lost while the listening connection is down).
RELOAD_EVERY_S: Final = 5.0


class ClusterEndpoints(EndpointEngines):
    """See the module docstring. `run()` is the billing loop; `load()` the first read."""

    def __init__(
        self,
        store: EndpointStore,
        catalogue: Catalogue,
        pool: CapacityPool,
        *,
        core_id: str,
        workspace_name: Callable[[str], Awaitable[str]],
        period_s: int,
        engine_factory: EngineFactory,
        now_ms: Callable[[], int],
        after_charge: Callable[[str], None] | None = None,
        accepting: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(
            catalogue, pool, period_s=period_s, engine_factory=engine_factory, now_ms=now_ms,
            accepting=accepting,
        )  # fmt: skip
        self._store = store
        self._core_id = core_id
        self._workspace_name = workspace_name
        self._after_charge = after_charge or (lambda workspace_id: None)
        # Every endpoint of the cluster not deleted, as last read or changed here.
        self._rows: dict[str, EndpointRow] = {}
        # Those of other cores, by what a request names.
        self._elsewhere: dict[tuple[str, str], EndpointRow] = {}
        # What this core last told the others of its endpoints' status.
        self._published: dict[str, tuple[str, str]] = {}
        self._mutex = asyncio.Lock()
        # A notice of a change arrived since the endpoints were last read.
        self._changed = False

    # ---- reads -----------------------------------------------------------------------------

    def views(self, workspace_id: str | None = None) -> list[EndpointView]:
        """Endpoints not deleted, of one workspace or all, oldest first (as last read)."""
        rows = sorted(self._rows.values(), key=lambda r: (r.endpoint.created_ms, r.endpoint.id))
        return [
            self._view_of(row)
            for row in rows
            if workspace_id is None or row.endpoint.workspace_id == workspace_id
        ]

    async def get(self, endpoint_id: str) -> EndpointView:
        """The endpoint as the ledger has it now, deleted or not; NotFound if none."""
        return self._view_of(await self._fetch(endpoint_id))

    def lookup(self, workspace_id: str, model_id: str) -> Served | None:
        """As `ReservedEndpoints.lookup`; an endpoint of the workspace that runs on another core
        is refused (UNAVAILABLE, before admission) naming that core."""
        runtime = self._by_model.get((workspace_id, model_id))
        if runtime is not None:
            endpoint = self._rows[runtime.id].endpoint
            if runtime.phase is Phase.RUNNING and endpoint.status is EndpointStatus.ACTIVE:
                now = self._now_ms()
                if now >= endpoint.paid_until_ms:
                    self._wake.set()  # the next period is due: charged now, not at the tick
                if now < endpoint.paid_until_ms + GRACE_MS:
                    return self._served(runtime)
                raise errors.EngineUnavailable(
                    f"The reserved endpoint {quote(model_id)} cannot be billed right now (the "
                    "ledger is not answering); it serves again once its next period is charged.",
                    retry_after_s=1.0,
                )
            raise self._not_serving(runtime, endpoint)
        row = self._elsewhere.get((workspace_id, model_id))
        if row is None:
            return None
        where = row.address or row.core_id
        raise errors.EngineUnavailable(
            f"The reserved endpoint {quote(model_id)} runs on the core at {where}; send its "
            "requests there (an edge does so by itself).",
            metadata={"core": row.address, "admitted": "false"},
            retry_after_s=1.0,
        )

    # ---- changes ---------------------------------------------------------------------------

    async def create(
        self, workspace_id: str, offering_id: str, replicas: int, name: str
    ) -> EndpointView:
        """Rents an endpoint on this core: its replicas from this core's pool, its first period
        affordable now (raising, with nothing created or billed, otherwise); it is charged when
        the replicas are ready."""
        ws_name = await self._workspace_name(workspace_id)
        offering, model_id = self._checked_new(ws_name, workspace_id, offering_id, replicas, name)
        periods = self._first_periods(offering)
        first = replicas * offering.nano_per_replica_period(self._period_s) * periods
        async with self._mutex:
            slots = self._acquire(offering, replicas)
            endpoint = Endpoint(
                id="ep_" + secrets.token_hex(8),
                workspace_id=workspace_id,
                name=name,
                model_id=model_id,
                offering_id=offering.id,
                base_model=offering.model,
                replicas=replicas,
                created_ms=self._now_ms(),
            )
            what = self._what(model_id, offering, replicas, periods, first=True)
            try:
                row = await self._store.create(
                    endpoint, self._core_id, first_nano=first, what=what,
                    most=MAX_ENDPOINTS_PER_WORKSPACE,
                )  # fmt: skip
            except BaseException:
                self._pool.release(offering.id, slots)
                raise
            self._install(row)
            runtime = self._add(row.endpoint, offering)
            runtime.slots = slots
            self._start(runtime)
        log.info("reserved endpoint %s created for %s: %d x %s", endpoint.id, workspace_id,
                 replicas, offering.id)  # fmt: skip
        return self._view_of(row)

    async def resize(self, endpoint_id: str, replicas: int) -> EndpointView:
        """As `ReservedEndpoints.resize`, on the endpoint's home core only."""
        async with self._mutex:
            row = await self._fetch(endpoint_id)
            runtime = self._home(row)
            check_replicas(replicas)
            endpoint = row.endpoint
            delta = replicas - endpoint.replicas
            if delta == 0:
                return self._view_of(row)
            has_engines = runtime.phase is not Phase.IDLE
            added = self._acquire(runtime.offering, delta) if delta > 0 and has_engines else []
            now = self._now_ms()
            remaining = 0
            if delta > 0 and runtime.phase is Phase.RUNNING and endpoint.paid_until_ms > now:
                remaining = -(-(endpoint.paid_until_ms - now) // self._period_ms)
            try:
                row = await self._store.resize(
                    endpoint_id,
                    replicas,
                    charge_nano=max(delta, 0) * self._per_period(runtime) * remaining,
                    charged_replica_s=max(delta, 0) * remaining * self._period_s,
                    rate_card_version=self._catalogue.rate_card.version,
                    core_id=self._core_id,
                    what=(
                        f"Resizing the reserved endpoint {quote(runtime.model_id)} to "
                        f"{replicas} replicas (the added ones for the rest of this period)"
                    ),
                )
            except BaseException:
                if added:
                    self._pool.release(runtime.offering.id, added)
                raise
            self._install(row)
            self._resized(runtime, added, delta, has_engines=has_engines)
        if remaining:
            self._after_charge(endpoint.workspace_id)
        return self._view_of(row)

    async def delete(self, endpoint_id: str) -> EndpointView:
        """Stops its billing at once on every core (the started period is not refunded) and,
        on its home core, its replicas."""
        async with self._mutex:
            row = await self._store.delete(endpoint_id)
            self._install(row)
        log.info("reserved endpoint %s deleted", endpoint_id)
        return self._view_of(row)

    def wake(self) -> None:
        """An endpoint changed in the ledger (a notice): the billing loop reads them now."""
        self._changed = True
        self._wake.set()

    # ---- billing ---------------------------------------------------------------------------

    async def load(self) -> None:
        """Reads every endpoint; this core's own start at the next tick (after a restart)."""
        async with self._mutex:
            await self._reload()

    async def run(self, tick_s: float) -> None:
        """The billing loop: every `tick_s`, when a period of this core's falls due, or at
        once when woken."""
        read_at = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._until_due(tick_s))
            self._wake.clear()
            reload = self._changed or time.monotonic() - read_at >= RELOAD_EVERY_S
            self._changed = False
            try:
                with db.purpose("reserved"):
                    await self.tick(reload=reload)
                if reload:
                    read_at = time.monotonic()
            except db.UNREACHABLE as exc:
                log.warning("reserved billing paused: the ledger cannot be reached (%s)", exc)
            except Exception:
                log.exception("reserved billing tick failed")

    async def tick(self, *, reload: bool = True) -> None:
        """Reads the endpoints (if `reload`), then bills what is due, suspends what cannot be
        paid, resumes what now can, and tells the other cores how this core's endpoints are."""
        async with self._mutex:
            if reload:
                await self._reload()
            if not self._accepting():
                return
            for runtime in list(self._runtimes.values()):
                await self._bill(runtime)
            for runtime in list(self._runtimes.values()):
                await self._publish(runtime)

    async def _bill(self, runtime: Runtime) -> None:
        if runtime.failure or runtime.phase is Phase.STARTING:
            return
        endpoint = self._rows[runtime.id].endpoint
        now = self._now_ms()
        if runtime.phase is Phase.IDLE:
            await self._try_start(runtime, endpoint, now)
        elif now >= endpoint.paid_until_ms:
            await self._charge_next(runtime, endpoint, now)

    async def _charge_next(self, runtime: Runtime, endpoint: Endpoint, now: int) -> None:
        """Charges the period that starts now (right after the paid one, unless the time
        between was not served), or suspends the endpoint if it cannot be paid."""
        first = endpoint.period == 0
        periods = self._first_periods(runtime.offering) if first else 1
        start = endpoint.paid_until_ms
        if now - start > GRACE_MS:
            start = now  # not served meanwhile (refused past the grace): not billed
        start = max(start, runtime.ready_ms)
        try:
            row = await self._store.charge_period(
                endpoint.id,
                period=endpoint.period + 1,
                start_ms=start,
                end_ms=start + periods * self._period_ms,
                replicas=endpoint.replicas,
                cost_nano=endpoint.replicas * self._per_period(runtime) * periods,
                rate_card_version=self._catalogue.rate_card.version,
                core_id=self._core_id,
                what=self._what(
                    runtime.model_id, runtime.offering, endpoint.replicas, periods, first=first
                ),
            )
        except errors.InsufficientCredits as refusal:
            runtime.refusal = refusal
            self._after_charge(endpoint.workspace_id)  # auto-reload, if the workspace has it
            await self._suspend(runtime, refusal)
            return
        except EndpointGone:
            await self._reload()  # deleted, or charged by a retry that did commit
            return
        runtime.refusal = None
        self._install(row)
        self._after_charge(endpoint.workspace_id)

    async def _try_start(self, runtime: Runtime, endpoint: Endpoint, now: int) -> None:
        """Starts an endpoint without engines once its next period can be paid (a suspended
        one resumes) and the pool has room: its charge is made when the replicas are ready."""
        resuming = endpoint.status is EndpointStatus.SUSPENDED
        if resuming or now >= endpoint.paid_until_ms:
            periods = self._first_periods(runtime.offering) if endpoint.period == 0 else 1
            try:
                await self._store.affordable(
                    endpoint.workspace_id,
                    endpoint.replicas * self._per_period(runtime) * periods,
                    self._what(runtime.model_id, runtime.offering, endpoint.replicas, periods,
                               first=endpoint.period == 0),
                )  # fmt: skip
            except errors.InsufficientCredits as refusal:
                runtime.refusal = refusal
                if not resuming:
                    await self._suspend(runtime, refusal)
                return
        slots = self._pool.acquire(runtime.offering.id, endpoint.replicas)
        runtime.capacity_short = slots is None
        if slots is None:
            return
        if resuming:
            log.info("reserved endpoint %s resuming", endpoint.id)
        runtime.slots = slots
        self._start(runtime)

    async def _suspend(self, runtime: Runtime, refusal: errors.InsufficientCredits) -> None:
        by_cap = refusal.metadata.get("limit") == "spend_cap"
        row = await self._store.suspend(
            runtime.id, SuspendedBy.SPEND_CAP if by_cap else SuspendedBy.BALANCE
        )
        self._install(row)
        if runtime.phase is not Phase.IDLE:
            log.warning("reserved endpoint %s suspended: %s", runtime.id, refusal.message)
            self._idle(runtime)

    async def _on_ready(self, runtime: Runtime) -> None:
        if not self._accepting():
            return
        async with self._mutex:
            if runtime.phase is not Phase.RUNNING or runtime.id not in self._rows:
                return
            endpoint = self._rows[runtime.id].endpoint
            now = self._now_ms()
            if endpoint.status is not EndpointStatus.ACTIVE or now >= endpoint.paid_until_ms:
                try:
                    await self._charge_next(runtime, endpoint, now)  # its period starts now
                except db.UNREACHABLE as exc:
                    log.warning("reserved billing paused: the ledger cannot be reached (%s)",
                                exc)  # fmt: skip
            await self._publish(runtime)

    async def _publish(self, runtime: Runtime) -> None:
        row = self._rows.get(runtime.id)
        if row is None:
            return
        status, reason = self._status(row.endpoint, runtime)
        said = (status.value, reason)
        if self._published.get(runtime.id) != said:
            await self._store.publish(runtime.id, *said)
            self._published[runtime.id] = said

    # ---- the endpoints as read -------------------------------------------------------------

    async def _reload(self) -> None:
        rows = await self._store.live()
        live = {row.endpoint.id for row in rows}
        self._rows = {row.endpoint.id: row for row in rows}
        self._elsewhere = {
            (r.endpoint.workspace_id, r.endpoint.model_id): r
            for r in rows
            if r.core_id != self._core_id
        }
        for endpoint_id in [i for i in self._runtimes if i not in live]:
            self._forget(endpoint_id)
        for row in rows:
            if row.core_id == self._core_id and row.endpoint.id not in self._runtimes:
                self._adopt(row)

    def _install(self, row: EndpointRow) -> None:
        """A change this core made (or read): the endpoint as it is now."""
        endpoint = row.endpoint
        if endpoint.status is EndpointStatus.DELETED:
            self._rows.pop(endpoint.id, None)
            self._elsewhere.pop((endpoint.workspace_id, endpoint.model_id), None)
            self._forget(endpoint.id)
            return
        self._rows[endpoint.id] = row
        if row.core_id != self._core_id:
            self._elsewhere[(endpoint.workspace_id, endpoint.model_id)] = row

    def _adopt(self, row: EndpointRow) -> None:
        """An endpoint of this core with no runtime yet (this process started after it was
        made): billing starts it."""
        card = self._catalogue.rate_card
        endpoint = row.endpoint
        offering = card.offerings.get(endpoint.offering_id)
        if offering is None or card.get(endpoint.base_model) is None:
            log.error("reserved endpoint %s rents %s (%s), which the rate card no longer lists;"
                      " put it back on the card", endpoint.id, endpoint.offering_id,
                      endpoint.base_model)  # fmt: skip
            return
        self._add(endpoint, offering)
        log.info("reserved endpoint %s is this core's: starting it", endpoint.id)

    def _forget(self, endpoint_id: str) -> None:
        runtime = self._runtimes.pop(endpoint_id, None)
        self._published.pop(endpoint_id, None)
        if runtime is not None:
            del self._by_model[(runtime.workspace_id, runtime.model_id)]
            self._idle(runtime)

    async def _fetch(self, endpoint_id: str) -> EndpointRow:
        row = await self._store.get(endpoint_id)
        if row is None:
            raise errors.NotFound(f"No reserved endpoint {quote(endpoint_id)}.")
        return row

    def _home(self, row: EndpointRow) -> Runtime:
        """The endpoint's runtime on this core, or InvalidRequest saying where to ask."""
        endpoint = row.endpoint
        if endpoint.status is EndpointStatus.DELETED:
            raise errors.InvalidRequest(
                f"The reserved endpoint {quote(endpoint.id)} is deleted.", param="endpoint_id"
            )
        runtime = self._runtimes.get(endpoint.id)
        if row.core_id != self._core_id or runtime is None:
            where = row.address or row.core_id
            raise errors.InvalidRequest(
                f"The reserved endpoint {quote(endpoint.id)} runs on the core at {where}, whose "
                f"capacity pool holds its replicas; resize it there (corvex admin --core "
                f"{where} endpoint resize ...).",
                param="endpoint_id",
            )
        return runtime

    def _view_of(self, row: EndpointRow) -> EndpointView:
        endpoint = row.endpoint
        runtime = self._runtimes.get(endpoint.id) if row.core_id == self._core_id else None
        if endpoint.status is EndpointStatus.DELETED:
            status, reason = Status.DELETED, ""
        elif runtime is not None:
            status, reason = self._status(endpoint, runtime)
        else:
            status = (
                Status(row.phase) if row.phase in {s.value for s in Status} else Status.STARTING
            )
            reason = row.reason
        return self._view(endpoint, runtime, status, reason, 0)

    def _until_due(self, tick_s: float) -> float:
        """Seconds to the next tick: sooner if a running endpoint's paid time ends first."""
        now = self._now_ms()
        due = [
            self._rows[r.id].endpoint.paid_until_ms - now
            for r in self._runtimes.values()
            if r.phase is Phase.RUNNING and r.id in self._rows
        ]
        soonest = min(due, default=tick_s * 1000) / 1000
        return max(0.0, min(tick_s, soonest))
