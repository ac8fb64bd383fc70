"""One core's part in a cluster: it connects to PostgreSQL, wires the mirror, the leases, the
charges and the account sync, runs their tasks, and tells the rest of the core when it may
admit. The server owns one when `core.ledger.backend` is `postgres`.

Start: migrate the schema (once across cores), reconcile what a previous process of this
core left (charges its journal holds that PostgreSQL lacks, with `ledger.charges: journal`),
release that process's leases (its requests died with it, so their holds are never charged),
load every account, subscribe, take this core's place among the live ones. Stop: commit the
charges still on their way, then release every lease, so their credit returns at once rather
than after their TTL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import ssl
import urllib.parse
from collections import defaultdict
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final

from prometheus_client import Counter, Gauge, Histogram

from corvex.money import NANO_PER_CENT, NANO_PER_USD, cents_from_usd
from corvex_core.cluster.customers import ClusterCustomers
from corvex_core.cluster.link import Link
from corvex_core.cluster.mirror import MirrorLedger
from corvex_core.cluster.reload import ClusterReloader
from corvex_core.cluster.shipper import ChargeShipper, to_pg
from corvex_core.cluster.supply import LeaseSupply, Policy
from corvex_core.cluster.sync import AccountSync
from corvex_core.config import CoreConfig, PostgresTlsConfig
from corvex_core.journal import Journal
from corvex_core.limits import RateLimiter
from corvex_core.payments import PaymentProvider
from corvex_core.pg import db, membership
from corvex_core.pg.accounts import AccountStore
from corvex_core.pg.leases import Charge, LeaseExceeded, LeaseGone, LeaseStore, Want
from corvex_core.pg.migrate import migrate
from corvex_core.records import Charged, Record
from corvex_core.state import LedgerState
from corvex_core.telemetry import Telemetry

log = logging.getLogger(__name__)

CORE_ID_FILE: Final = "core_id"
# Start-up waits this long for the first full load of the accounts.
FRESH_TIMEOUT_S: Final = 30.0
# A core counts as live (for the shares of per-minute limits) while its last heartbeat is
# younger than this many intervals, and at least a lease TTL: a core joining shrinks every
# share within a heartbeat, but one that seems gone (a late heartbeat on a busy machine)
# grows the others' shares only once it would have lost its leases too, so a flap never lets
# the shares sum past the limit.
LIVE_INTERVALS: Final = 3
_LOOPBACK: Final = ("127.0.0.1", "::1", "localhost")
_COMMIT_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1, 5)


class ClusterError(Exception):
    """The core cannot take its place in the cluster; the message says why."""


def core_id_of(data_dir: Path) -> str:
    """This core's id: made once and kept in data_dir, so a restart finds its leases."""
    path = data_dir / CORE_ID_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write("core-" + secrets.token_hex(6) + "\n")
    return path.read_text().strip()


def client_ssl(tls: PostgresTlsConfig, dsn: str, *, allow_plaintext: bool) -> ssl.SSLContext | None:
    """The TLS context of the connection to PostgreSQL. Without one (and without an sslmode
    in the DSN) only a loopback server is accepted, unless plaintext is allowed."""
    if tls.ca_file:
        context = ssl.create_default_context(cafile=tls.ca_file)
        if tls.cert_file:
            context.load_cert_chain(tls.cert_file, tls.key_file or None)
        return context
    parts = urllib.parse.urlsplit(dsn)
    sslmode = urllib.parse.parse_qs(parts.query).get("sslmode", [""])[0]
    verified = sslmode in ("verify-ca", "verify-full")
    if parts.hostname not in _LOOPBACK and not verified and not allow_plaintext:
        raise ClusterError(
            f"core.ledger.dsn names {parts.hostname}, which is not a loopback address, "
            "without TLS: set core.ledger.tls.ca_file (or sslmode=verify-full in the DSN), "
            "or core.allow_plaintext: true on a network that encrypts for you"
        )
    return None


def _redacted(dsn: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return f"{parts.hostname}:{parts.port or 5432}{parts.path}"


class ClusterNode:
    """See the module docstring."""

    def __init__(
        self,
        config: CoreConfig,
        ledger: MirrorLedger,
        limiter: RateLimiter,
        telemetry: Telemetry,
        provider: PaymentProvider,
        *,
        journal: Journal | None,
        clock: db.Clock = db.utc_now,
    ) -> None:
        settings = config.ledger
        if not settings.dsn:
            raise ClusterError(
                "core.ledger.backend is postgres but core.ledger.dsn is empty "
                "(set it, or CORVEX_CORE_LEDGER_DSN)"
            )
        assert (journal is not None) == (settings.charges == "journal")
        self.config = settings
        self.journal = journal
        self.core_id = settings.core_id or core_id_of(Path(config.data_dir))
        self._ledger = ledger
        self._clock = clock
        self._ssl = client_ssl(settings.tls, settings.dsn, allow_plaintext=config.allow_plaintext)
        self._metrics(telemetry)
        self.pool = db.make_pool(
            settings.dsn, max_size=settings.pool_size, ssl=self._ssl, on_statement=self._counted
        )
        self.store = LeaseStore(self.pool, clock=clock)
        self.accounts = AccountStore(self.pool, clock=clock)
        self.link = Link(self.pool)
        self.shipper = ChargeShipper(
            self.store,
            on_down=self.link.down,
            on_committed=self._on_committed,
            on_lost=self._on_lost,
            on_settled=self._on_shipped,
        )
        ahead = cents_from_usd(settings.lease_credit_usd) * NANO_PER_CENT
        exact_below = cents_from_usd(settings.exact_below_usd) * NANO_PER_CENT
        policy = Policy(
            core_id=self.core_id,
            ahead_nano=ahead,
            exact_below_nano=exact_below,
            ahead_tokens=settings.lease_tokens,
            exact_below_tokens=settings.exact_below_tokens,
            ttl_s=settings.lease_ttl_s,
            renew_every_s=settings.renew_every_s,
        )
        if settings.renew_every_s * 2 > settings.lease_ttl_s:
            raise ClusterError("core.ledger.renew_every_s must be at most half of lease_ttl_s")
        self.supply = LeaseSupply(
            self.store, ledger, limiter, self.shipper, self.link, policy, clock=clock,
            gate=self.gate,
        )  # fmt: skip
        self.sync = AccountSync(
            self.accounts, ledger, self.supply, self.link, dsn=settings.dsn, ssl=self._ssl,
            resync_every_s=settings.resync_every_s,
        )  # fmt: skip
        self.reloader = ClusterReloader(
            self.accounts, ledger, self.link, provider,
            retry_initial_s=config.accounts.auto_reload_retry_initial_s,
            retry_max_s=config.accounts.auto_reload_retry_max_s,
        )  # fmt: skip
        self.customers = ClusterCustomers(
            self.pool, ledger, self.link, provider, config.customers, clock=clock
        )
        self.address = ""
        self.live_cores = 1
        self._tasks: list[asyncio.Task[Any]] = []
        self._shipper_task: asyncio.Task[None] | None = None
        # With charges in the journal: each charge not yet in PostgreSQL, by its record number.
        self._unshipped: dict[str, int] = {}
        self._snapshot_seq = 0

    # ---- what the rest of the core calls ---------------------------------------------------

    def gate(self) -> None:
        """Raises UNAVAILABLE when this core must not admit: its mirror may be missing account
        changes, or (charges committed to PostgreSQL) the database is away."""
        self.sync.check()
        if self.journal is None:
            self.link.check()

    async def durable(self) -> None:
        """Every change so far is durable: nothing to wait for when charges go to PostgreSQL
        (each request waits for its own, `confirm`); the journal's sync point otherwise."""
        if self.journal is not None:
            await self.journal.sync_point()

    async def confirm(self, charge: Charged) -> None:
        await self.shipper.confirm(charge.charge_id, self.config.charge_timeout_s)

    def sink(self, record: Record) -> None:
        """Where the mirror's records go: charges to the journal (with `ledger.charges:
        journal`), before the request is told its cost; nothing else is durable here."""
        if self.journal is not None and isinstance(record, Charged):
            self.journal.append(record)
            self._unshipped[record.charge_id] = self.journal.last_seq

    # ---- start and stop --------------------------------------------------------------------

    async def start(self, address: str) -> None:
        self.address = address
        where = _redacted(self.config.dsn)
        try:
            await self.pool
            async with self.pool.acquire() as conn:
                applied = await migrate(conn)
        except db.UNREACHABLE as exc:
            raise ClusterError(f"cannot reach PostgreSQL at {where}: {exc}") from exc
        if applied:
            log.info("ledger schema migrated: %s", applied)
        if self.journal is not None:
            await self._reconcile()
        credit, tokens = await self.store.release_core(self.core_id)
        if credit or tokens:
            log.info("released the leases of this core's previous process: $%s, %d tokens",
                     credit / NANO_PER_USD, tokens)  # fmt: skip
        await self._heartbeat()
        self._shipper_task = asyncio.ensure_future(self.shipper.run())
        self._spawn(self.link.run())
        self._spawn(self.sync.run())
        self._spawn(self.sync.resync())
        self._spawn(self.supply.run())
        self._spawn(self.customers.activity.run())
        self._spawn(self._every(self.config.sweep_every_s, self._sweep))
        self._spawn(self._every(self.config.heartbeat_every_s, self._heartbeat))
        if self.journal is not None:
            self._spawn(self._every(self.config.renew_every_s, self._snapshot))
        try:
            await asyncio.wait_for(self.sync.wait_fresh(), FRESH_TIMEOUT_S)
        except TimeoutError:
            raise ClusterError(f"could not load the accounts from PostgreSQL at {where}") from None
        log.info("in the cluster as %s (ledger at %s, %d live cores, charges durable in %s)",
                 self.core_id, where, self.live_cores, self.config.charges)  # fmt: skip

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        drained = await self.shipper.drain(self.config.charge_timeout_s)
        try:
            await self.supply.close(release=drained and self.link.up)
        except db.UNREACHABLE as exc:
            log.warning("could not release this core's leases (%s): they lapse after their TTL",
                        exc)  # fmt: skip
        if not drained:
            log.error("%d charges were not committed before stopping", self.shipper.backlog)
        if self._shipper_task is not None:
            self._shipper_task.cancel()
            await asyncio.gather(self._shipper_task, return_exceptions=True)
        await self.reloader.close()
        await self.customers.close()
        try:
            await asyncio.wait_for(self.pool.close(), 5.0)
        except (TimeoutError, *db.UNREACHABLE):
            self.pool.terminate()

    # ---- background --------------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.ensure_future(coroutine))

    async def _every(self, interval_s: float, step: Any) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await step()
            except Exception as exc:  # unreachable: the link says so
                log.debug("%s failed: %s", getattr(step, "__name__", step), exc)

    async def _sweep(self) -> None:
        with db.purpose("sweep"):
            expired = await self.link.call(self.store.expire(self._clock()))
        if expired.leases or expired.token_leases:
            log.info("expired %d leases and %d token leases of lapsed cores",
                     len(expired.leases), len(expired.token_leases))  # fmt: skip

    async def _heartbeat(self) -> None:
        interval = self.config.heartbeat_every_s
        with db.purpose("heartbeat"):
            now = self._clock()
            await self.link.call(membership.heartbeat(self.pool, self.core_id, self.address, now))
            within = max(interval * LIVE_INTERVALS, self.config.lease_ttl_s)
            members = await self.link.call(membership.live(self.pool, now, within))
        ids = sorted({m.core_id for m in members} | {self.core_id})
        self.live_cores = len(ids)
        self.sync.set_shares(len(ids), ids.index(self.core_id))

    async def _snapshot(self) -> None:
        """With charges in the journal: marks everything before the oldest charge not yet in
        PostgreSQL as shipped (an empty snapshot there), so a restart re-ships only the rest."""
        journal = self.journal
        assert journal is not None
        upto = min(self._unshipped.values()) - 1 if self._unshipped else journal.last_seq
        if upto > self._snapshot_seq and journal.failure is None:
            journal.snapshot(LedgerState(), seq=upto)
            self._snapshot_seq = upto

    def _on_shipped(self, charge_id: str) -> None:
        self._unshipped.pop(charge_id, None)

    def _on_committed(self, workspace_id: str, charges: int, seconds: float) -> None:
        self._commit_seconds.observe(seconds)
        self._charges_committed.inc(charges)
        self.reloader.check(workspace_id)
        self.customers.alerts.check(workspace_id)

    def _on_lost(self, charge: Charge) -> None:
        self._charges_lost.inc()

    async def _reconcile(self) -> None:
        """Charges the journal of this core's previous process holds but PostgreSQL lacks (it
        died between the fsync and the commit) are paid from the leases that process held,
        which its requests were admitted on; a charge no lease can pay any more is lost."""
        journal = self.journal
        assert journal is not None
        recovery = await asyncio.to_thread(journal.recover)
        self._snapshot_seq = recovery.snapshot_seq
        charges = [r for r in recovery.records if isinstance(r, Charged)]
        if not charges:
            return
        known = await self.store.known_charges([c.charge_id for c in charges])
        orphans: dict[str, list[Charged]] = defaultdict(list)
        for charge in charges:
            if charge.charge_id not in known:
                orphans[charge.workspace_id].append(charge)
        leases, token_leases = await self.store.leases_of(self.core_id)
        del token_leases  # their tokens are counted on the key whatever lease pays
        shipped = lost = 0
        for workspace_id, batch in orphans.items():
            pg = [to_pg_charge(c) for c in batch]
            own = [lease.id for lease in leases if lease.workspace_id == workspace_id]
            if await self._pay_orphans(workspace_id, own, pg):
                shipped += len(pg)
            else:
                lost += len(pg)
                self._charges_lost.inc(len(pg))
        log.info("reconciled the journal: %d charges shipped, %d already in the ledger, %d lost",
                 shipped, len(known), lost)  # fmt: skip

    async def _pay_orphans(self, workspace_id: str, own: list[int], pg: list[Charge]) -> bool:
        cost = sum(c.cost_nano for c in pg)
        for lease_id in sorted(own, reverse=True):
            try:
                await self.store.charge(lease_id, pg)
                return True
            except (LeaseGone, LeaseExceeded):
                continue
        grant = await self.store.lease_credit(
            workspace_id, self.core_id, None, Want(max(cost, 1), max(cost, 1), max(cost, 1)), 60
        )
        if grant.lease is None:
            log.error("%d charges of %s ($%s) cannot be paid: the workspace has no credit left",
                      len(pg), workspace_id, cost / NANO_PER_USD)  # fmt: skip
            return False
        await self.store.charge(grant.lease.id, pg)
        await self.store.release(grant.lease.id)
        return True

    # ---- what an operator watches ------------------------------------------------------------

    def _metrics(self, telemetry: Telemetry) -> None:
        r = telemetry.registry
        self._round_trips = Counter(
            "corvex_ledger_round_trips",
            "Statements sent to PostgreSQL (one round trip each), by what they were for: admit "
            "(a request waited for a lease), charge, renew, sync, auth, sweep, heartbeat, "
            "accounts, reload, probe, activity (the request log).",
            ["purpose"], registry=r,
        )  # fmt: skip
        self._commit_seconds = Histogram(
            "corvex_charge_commit_seconds", "Time to commit one batch of charges to PostgreSQL.",
            buckets=_COMMIT_BUCKETS, registry=r,
        )  # fmt: skip
        self._charges_committed = Counter(
            "corvex_charges_committed", "Charges committed to PostgreSQL.", registry=r
        )
        self._charges_lost = Counter(
            "corvex_charges_lost",
            "Charges that could not be recorded (their lease lapsed first): served, not billed.",
            registry=r,
        )
        gauges = {
            "corvex_lease_credit_usd": ("Credit leased to this core, USD.", "credit_nano"),
            "corvex_lease_held_usd": ("Of it, held by requests in flight, USD.", "held_nano"),
            "corvex_lease_free_usd": (
                "Of it, unused: stranded while no request needs it, USD.",
                "free_nano",
            ),
        }
        for name, (doc, field) in gauges.items():
            Gauge(name, doc, registry=r).set_function(self._usd_of(field))
        Gauge("corvex_leases", "Credit leases this core holds.", registry=r).set_function(
            lambda: self.supply.stats()["leases"]
        )
        Gauge("corvex_ledger_up", "1 while PostgreSQL answers.", registry=r).set_function(
            lambda: 1 if self.link.up else 0
        )
        Gauge(
            "corvex_ledger_mirror_fresh", "1 while no account change can have been missed.",
            registry=r,
        ).set_function(lambda: 1 if self.sync.fresh else 0)  # fmt: skip
        Gauge(
            "corvex_charge_backlog", "Charges on their way to PostgreSQL.", registry=r
        ).set_function(lambda: self.shipper.backlog)
        Gauge("corvex_cluster_cores", "Live cores in the cluster.", registry=r).set_function(
            lambda: self.live_cores
        )

    def _usd_of(self, field: str) -> Callable[[], float]:
        return lambda: self.supply.stats()[field] / NANO_PER_USD

    def _counted(self, purpose: str) -> None:
        self._round_trips.labels(purpose).inc()

    def health(self) -> dict[str, Any]:
        stats = self.supply.stats()
        return {
            "backend": "postgres",
            "core_id": self.core_id,
            "database": _redacted(self.config.dsn),
            "reachable": self.link.up,
            "mirror_fresh": self.sync.fresh,
            "charges_durable_in": self.config.charges,
            "charge_backlog": self.shipper.backlog,
            "charges_lost": self.shipper.lost,
            "live_cores": self.live_cores,
            "leases": stats["leases"],
            "lease_credit_usd": stats["credit_nano"] / NANO_PER_USD,
            "lease_free_usd": stats["free_nano"] / NANO_PER_USD,
        }


def to_pg_charge(charge: Charged) -> Charge:
    return to_pg(charge, None)
