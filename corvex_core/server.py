"""The core process: wires rate card, engines, ledger, journal and servicers into one grpc.aio
server, and owns its life: start (recover, load engines, then report SERVING), housekeeping,
and the drain on SIGTERM. It holds no business rule of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import secrets
import signal
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from corvex import readyfile, tls
from corvex.money import NANO_PER_USD, MoneyError, cents_from_usd
from corvex.ratecard import ModelRate, RateCard, RateCardError, load_rate_card
from corvex.v1 import accounts_pb2, accounts_pb2_grpc, inference_pb2, inference_pb2_grpc
from corvex_core import access, ops_http
from corvex_core.activity import Activity
from corvex_core.alerts import Alerter
from corvex_core.capacity import CapacityError, CapacityPool
from corvex_core.catalogue import Catalogue
from corvex_core.cluster.mirror import MirrorLedger
from corvex_core.cluster.node import ClusterError, ClusterNode
from corvex_core.config import CoreConfig, EngineConfig
from corvex_core.engines.base import Engine, EngineError
from corvex_core.engines.registry import build_engine
from corvex_core.journal import Journal, JournalCorrupt, JournalError
from corvex_core.ledger import Ledger
from corvex_core.lifecycle import Lifecycle
from corvex_core.limits import RateLimiter
from corvex_core.metering import Meter, Metering, UnmeteredMeter
from corvex_core.payments import AutoReloader, Checkouts, PaymentProvider, make_provider
from corvex_core.pg.endpoints import EndpointStore
from corvex_core.records import Record
from corvex_core.reserved import EndpointEngines, ReservedEndpoints
from corvex_core.reserved_cluster import ClusterEndpoints
from corvex_core.servicers import accounts, inference
from corvex_core.servicers.accounts import AccountsServicer
from corvex_core.servicers.cluster_accounts import ClusterAccountsServicer
from corvex_core.servicers.inference import InferenceServicer
from corvex_core.servicers.interceptor import CallInterceptor
from corvex_core.serving import Service
from corvex_core.state import LedgerState
from corvex_core.telemetry import Telemetry

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    accounts_pb2.DESCRIPTOR.services_by_name["Accounts"].full_name,
)
_HOUSEKEEPING_S = 5.0
# Answers can be large (2,048 embeddings); requests are bounded by core.max_request_bytes.
_MAX_SEND_BYTES = 64 * 1024 * 1024


class StartupError(Exception):
    """The core cannot start; the message tells the operator why."""


def build_engines(config: CoreConfig, models: Iterable[ModelRate]) -> list[Engine]:
    """Engines, not yet started, for the models of `models` this core serves (the one place
    engines are made: at start and for models a reloaded rate card adds)."""
    engines = []
    for model in models:
        engine_config = config.engines.for_model(model.id)
        if engine_config is None:
            continue  # not served by this core
        try:
            engines.append(
                build_engine(model.id, engine_config, context_length=model.context_length)
            )
        except (ValueError, TypeError) as exc:
            raise StartupError(f"core.engines: {model.id}: {exc}") from exc
    return engines


def initial_engines(config: CoreConfig, rate_card: RateCard) -> list[Engine]:
    unknown = sorted(set(config.engines.models) - set(rate_card.by_id))
    if unknown:
        raise StartupError(
            f"core.engines.models names models that are not on the rate card: {', '.join(unknown)}"
        )
    engines = build_engines(config, rate_card.models)
    if not engines:
        raise StartupError("core.engines serves none of the rate card's models")
    return engines


def secure_data_dir(data_dir: Path) -> None:
    """The data directory holds every balance, invoice and key hash: 0700, its files 0600.
    Looser modes found at start are tightened, with a warning."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in (data_dir, *data_dir.iterdir()):
        mode = path.stat().st_mode & 0o777
        wanted = 0o700 if path.is_dir() else 0o600
        if mode & 0o077:
            log.warning("%s was mode %o; setting %o", path, mode, wanted)
            path.chmod(wanted)


def admin_token(config: CoreConfig, data_dir: Path) -> str:
    """The configured admin token, or the one kept in data_dir (created on first start)."""
    if config.admin_token:
        return config.admin_token
    path = data_dir / "admin_token"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write("corvex-admin-" + secrets.token_urlsafe(32) + "\n")
        log.info("created an admin token in %s", path)
    return path.read_text().strip()


def _starter_promotion_cents(config: CoreConfig) -> int:
    """The configured starter promotion's amount, checked with its end date at start."""
    starter = config.customers.starter
    try:
        cents = cents_from_usd(starter.amount_usd)
        if starter.ends:
            dt.date.fromisoformat(starter.ends)
    except (MoneyError, ValueError) as exc:
        raise StartupError(f"core.customers.starter: {exc}") from exc
    if starter.ends and len(starter.ends) != 10:
        raise StartupError("core.customers.starter.ends: a date, YYYY-MM-DD")
    return cents


def _grpc_server(config: CoreConfig, interceptor: CallInterceptor) -> grpc.aio.Server:
    return grpc.aio.server(
        interceptors=[interceptor],
        # A bound on calls in flight bounds everything per call (streams, journal waiters);
        # beyond it gRPC answers RESOURCE_EXHAUSTED at once.
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.max_send_message_length", _MAX_SEND_BYTES),
            ("grpc.so_reuseport", 0),
            # Keepalive as grpc's doc/keepalive.md asks (the edge pings while idle).
            ("grpc.keepalive_permit_without_calls", 1),
            (
                "grpc.http2.min_ping_interval_without_data_ms",
                round(config.keepalive_min_ping_interval_s * 1000),
            ),
            ("grpc.http2.max_ping_strikes", 2),
        ],
    )


def _rate_card(config: CoreConfig) -> RateCard:
    try:
        return load_rate_card(config.rate_card)
    except ValueError as exc:
        raise StartupError(str(exc)) from exc


def _journal(config: CoreConfig, data_dir: Path) -> Journal | None:
    """The core's journal: all of its durable state, or in a cluster only charges on their
    way to PostgreSQL (`ledger.charges: journal`), or none."""
    clustered = config.ledger.backend == "postgres"
    if not config.journal.enabled or (clustered and config.ledger.charges != "journal"):
        return None
    return Journal(data_dir, max_batch=config.journal.max_batch, fsync=config.journal.fsync)


class Core:
    """One core process. `start()`, then `wait()` until a signal drains it."""

    def __init__(
        self, config: CoreConfig, *, payment_provider: PaymentProvider | None = None
    ) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.lifecycle = Lifecycle()
        # In a cluster the ledger is a mirror of PostgreSQL's, and the journal only holds
        # charges (with `ledger.charges: journal`), if anything.
        clustered = config.ledger.backend == "postgres"
        self.ledger = MirrorLedger() if clustered else Ledger()
        self.limiter = RateLimiter()
        self.journal = _journal(config, self.data_dir)
        self.health = health.aio.HealthServicer()
        self.telemetry = Telemetry()
        self.activity = Activity(self.ledger.now_ms)
        customers = config.customers
        self.alerter = Alerter(
            self.ledger,
            attempts=customers.webhook_attempts,
            retry_initial_s=customers.webhook_retry_initial_s,
            timeout_s=customers.webhook_timeout_s,
            allow_private_addresses=customers.webhook_allow_private_addresses,
        )
        secure_data_dir(self.data_dir)
        self._admin_token = admin_token(config, self.data_dir)
        rate_card = _rate_card(config)
        self.catalogue = Catalogue(rate_card, initial_engines(config, rate_card))
        provider = payment_provider or make_provider(config.accounts.payment_provider)
        self.reloader = AutoReloader(
            self.ledger,
            self.journal,
            provider,
            retry_initial_s=config.accounts.auto_reload_retry_initial_s,
            retry_max_s=config.accounts.auto_reload_retry_max_s,
            on_failure=self.alerter.check,
        )
        self.checkouts = Checkouts(self.ledger, provider, self.durable)
        self.cluster = self._cluster_node(provider) if clustered else None
        cluster = self.cluster
        self._interceptor = interceptor = self._call_interceptor()
        self.server = _grpc_server(config, interceptor)
        self.meter = self._metering()
        self.pool, self.reserved = self._reserved_endpoints(rate_card)
        confirm = cluster.confirm if cluster and cluster.journal is None else None
        self.service = Service(
            self.catalogue,
            self.meter,
            self.lifecycle,
            self.durable,
            reserved=self.reserved,
            confirm=confirm,
        )
        self.starter_promotion_cents = _starter_promotion_cents(config)
        self.port = 0
        self.metrics_port = 0
        self.last_reload_error = ""
        self._reload_lock = asyncio.Lock()
        self._ops: web.AppRunner | None = None
        self._stopped = asyncio.Event()
        self._draining: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def _cluster_node(self, provider: PaymentProvider) -> ClusterNode:
        assert isinstance(self.ledger, MirrorLedger)
        try:
            return ClusterNode(
                self.config, self.ledger, self.limiter, self.telemetry, provider,
                journal=self.journal,
            )  # fmt: skip
        except (ClusterError, OSError, ValueError) as exc:
            raise StartupError(f"core.ledger: {exc}") from exc

    def _call_interceptor(self) -> CallInterceptor:
        """What every call goes through. In a cluster, sessions and the request log are
        PostgreSQL's (cluster/customers.py), so any core resolves any session."""
        cluster = self.cluster
        return CallInterceptor(
            admin_token=self._admin_token,
            directory=(
                cluster.customers.directory if cluster else access.LedgerDirectory(self.ledger)
            ),
            telemetry=self.telemetry,
            lifecycle=self.lifecycle,
            activity=cluster.customers.activity if cluster else self.activity,
            kinds={**inference.CALL_KINDS, **accounts.CALL_KINDS},
            rules=accounts.ACCESS,
        )

    def _metering(self) -> Metering:
        if self.config.benchmark_unmetered:
            return UnmeteredMeter()
        cluster = self.cluster
        # In a cluster, auto-reload and alerts look at PostgreSQL's balances, not the mirror's.
        return Meter(
            self.ledger,
            self.limiter,
            reloader=None if cluster else self.reloader,
            on_charge=None if cluster else self.alerter.check,
            supply=cluster.supply if cluster else None,
            key_lookup=cluster.sync.lookup if cluster else None,
        )

    def _reserved_endpoints(self, rate_card: RateCard) -> tuple[CapacityPool, EndpointEngines]:
        """This core's capacity pool and its reserved endpoints: billed from its journal, or
        in a cluster from PostgreSQL (reserved_cluster.py)."""
        try:
            pool = CapacityPool.from_config(self.config, rate_card)
        except CapacityError as exc:
            raise StartupError(str(exc)) from exc

        def engine_factory(model: str, engine: EngineConfig, context: int) -> Engine:
            return build_engine(model, engine, context_length=context)

        def accepting() -> bool:
            return self.lifecycle.accepting

        period_s = self.config.reserved.period_s
        cluster = self.cluster
        if cluster is None:
            reserved: EndpointEngines = ReservedEndpoints(
                self.ledger, self.catalogue, pool, period_s=period_s,
                engine_factory=engine_factory, after_charge=self._after_charge,
                accepting=accepting,
            )  # fmt: skip
            return pool, reserved
        accounts = cluster.accounts

        async def workspace_name(workspace_id: str) -> str:
            return (await accounts.workspace(workspace_id)).name

        endpoints = ClusterEndpoints(
            EndpointStore(cluster.pool), self.catalogue, pool, core_id=cluster.core_id,
            workspace_name=workspace_name, period_s=period_s, engine_factory=engine_factory,
            now_ms=self.ledger.now_ms, after_charge=cluster.reloader.check, accepting=accepting,
        )  # fmt: skip
        cluster.sync.on_endpoints = endpoints.wake
        return pool, endpoints

    async def _recover_endpoints(self) -> None:
        """Every reserved endpoint back (its engines start at the billing loop's first tick)."""
        try:
            if isinstance(self.reserved, ClusterEndpoints):
                await self.reserved.load()
            elif isinstance(self.reserved, ReservedEndpoints):
                self.reserved.recover()
        except ValueError as exc:
            raise StartupError(str(exc)) from exc

    def _after_charge(self, workspace_id: str) -> None:
        """An endpoint's period was charged: the same follow-ups as a request's charge."""
        self.reloader.check(workspace_id)
        self.alerter.check(workspace_id)

    async def start(self) -> None:
        """Serves health at once (NOT_SERVING), recovers the ledger, loads the engines, and
        only then reports SERVING and admits requests."""
        inference_pb2_grpc.add_InferenceServicer_to_server(
            InferenceServicer(self.service, self.catalogue, self._interceptor.guard), self.server
        )
        accounts_pb2_grpc.add_AccountsServicer_to_server(self._accounts_servicer(), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.config.host}:{self.config.port}"
        try:
            credentials = self._server_credentials()
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {address}: {exc}") from exc
        if self.port == 0:
            raise StartupError(f"cannot listen on {address}")
        await self.server.start()
        log.info("core listening on %s:%d (not serving until ready)", self.config.host, self.port)
        await self._start_ops()
        await self._recover()
        await self._recover_endpoints()
        engines = self.catalogue.engines
        try:
            await asyncio.gather(*(engine.start() for engine in engines))
        except EngineError as exc:
            raise StartupError(f"an engine failed to start: {exc}") from exc
        for engine in engines:
            log.info("engine ready", extra={"model": engine.model_id, "engine": engine.kind})
        self._background(self._housekeeping())
        self._background(self.reserved.run(self.config.reserved.tick_s))
        self.lifecycle.serving()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("core serving %d models", len(engines))

    def _accounts_servicer(self) -> accounts_pb2_grpc.AccountsServicer:
        accounts = self.config.accounts
        starter = cents_from_usd(accounts.starter_credits_usd)
        min_topup = cents_from_usd(accounts.min_topup_usd)
        if self.cluster is not None:
            assert isinstance(self.reserved, ClusterEndpoints)
            return ClusterAccountsServicer(
                self.cluster.accounts, self.cluster.sync, self.cluster.link,
                cluster_customers=self.cluster.customers, customers_config=self.config.customers,
                starter_promotion_cents=self.starter_promotion_cents,
                starter_credits_cents=starter, min_topup_cents=min_topup,
                endpoints=self.reserved, create_wait_s=self.config.reserved.create_wait_s,
            )  # fmt: skip
        assert isinstance(self.reserved, ReservedEndpoints)
        return AccountsServicer(
            self.ledger,
            durable=self.durable,
            starter_credits_cents=starter,
            min_topup_cents=min_topup,
            reserved=self.reserved,
            create_wait_s=self.config.reserved.create_wait_s,
            customers=self.config.customers,
            starter_promotion_cents=self.starter_promotion_cents,
            checkouts=self.checkouts,
            alerter=self.alerter,
            activity=self.activity,
        )

    def _server_credentials(self) -> Any:
        """TLS credentials for the gRPC port, or None for plaintext (loopback only, unless
        allowed)."""
        config = self.config
        if not config.tls.enabled:
            if not tls.is_loopback(config.host) and not config.allow_plaintext:
                raise StartupError(
                    f"core.host {config.host} is not a loopback address and core.tls is not "
                    "set: configure core.tls.cert_file and key_file (and client_ca_file for "
                    "mutual TLS), or set core.allow_plaintext: true on a network that "
                    "encrypts for you"
                )
            return None
        try:
            certificate = tls.read_pem(config.tls.cert_file, "core.tls.cert_file")
            key = tls.read_pem(config.tls.key_file, "core.tls.key_file")
            client_ca = (
                tls.read_pem(config.tls.client_ca_file, "core.tls.client_ca_file")
                if config.tls.client_ca_file
                else None
            )
        except tls.TlsError as exc:
            raise StartupError(str(exc)) from exc
        return grpc.ssl_server_credentials(
            [(key, certificate)],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    async def durable(self) -> None:
        """Returns once every change made so far is on disk (raises JournalError if it
        cannot be). Without a journal (benchmarks), at once. In a cluster, see
        `ClusterNode.durable`."""
        if self.cluster is not None:
            await self.cluster.durable()
        elif self.journal is not None:
            await self.journal.sync_point()

    async def _join_cluster(self) -> None:
        cluster = self.cluster
        assert cluster is not None
        journal = self.journal
        if journal is not None:
            journal.on_batch = self.telemetry.on_journal_batch
            journal.on_failure = self._on_journal_failure
        on_record = self.telemetry.on_record

        def sink(record: Record) -> None:
            cluster.sink(record)
            on_record(record)

        self.ledger.set_sink(sink)
        try:
            await cluster.start(f"{tls.host_of(self.config.host) or '127.0.0.1'}:{self.port}")
        except ClusterError as exc:
            raise StartupError(str(exc)) from exc
        if journal is not None:
            journal.start()

    async def _recover(self) -> None:
        if self.cluster is not None:
            await self._join_cluster()
            return
        if self.config.benchmark_unmetered:
            log.warning("benchmark_unmetered is on: no key, limit or charge is checked")
        if self.journal is None:
            log.warning("the journal is disabled (benchmark mode): nothing survives a restart")
            telemetry_record, reserved_record = self.telemetry.on_record, self.reserved.on_record

            def memory_sink(record: Record) -> None:
                telemetry_record(record)
                reserved_record(record)

            self.ledger.set_sink(memory_sink)
            return
        recovery = await asyncio.to_thread(self.journal.recover)
        if recovery.state is not None:
            self.ledger.restore(recovery.state)
        first = recovery.snapshot_seq + 1
        for seq, record in enumerate(recovery.records, start=first):
            try:
                self.ledger.apply(record)
            except (AssertionError, KeyError) as exc:
                raise JournalCorrupt(
                    f"Journal record {seq} does not fit the records before it ({exc!r}); the "
                    "core will not rebuild balances from it. Restore the data directory from "
                    "a backup."
                ) from exc
        self.journal.start()
        self.journal.on_batch = self.telemetry.on_journal_batch
        self.journal.on_failure = self._on_journal_failure
        journal_append, on_record = self.journal.append, self.telemetry.on_record
        reserved_record = self.reserved.on_record

        def sink(record: Record) -> None:
            journal_append(record)
            on_record(record)
            reserved_record(record)

        self.ledger.set_sink(sink)
        state = self.ledger.state
        log.info(
            "ledger recovered: %d workspaces, %d keys, %d charges (snapshot at record %d, "
            "%d records replayed)",
            len(state.workspaces),
            len(state.keys),
            state.charges,
            recovery.snapshot_seq,
            len(recovery.records),
        )

    async def _set_health(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(_HOUSEKEEPING_S)
            self.limiter.sweep()
            journal = self.journal
            if journal is None or journal.failure is not None or self.cluster is not None:
                continue
            if journal.records_since_snapshot >= self.config.journal.snapshot_every:
                journal.snapshot(self.ledger.state)

    def _on_journal_failure(self, error: JournalError) -> None:
        """A write failed (a full disk, an I/O error): from this instant nothing that writes is
        taken, and memory falls back to what is on disk, so no read shows a balance, key or
        invoice the disk does not have. Called once, on the event loop."""
        reason = (
            "The core cannot write its journal (see its log and /health); it serves reads "
            "only. Free the disk and restart it, or retry on another core."
        )
        if not self.lifecycle.failed(reason):
            return
        log.critical("the core is read-only from now on: %s", error)
        self._background(self._fall_back_to_disk())

    async def _fall_back_to_disk(self) -> None:
        assert self.journal is not None
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        aborted = await self.lifecycle.abort_all()
        if self.cluster is not None:
            # The mirror is PostgreSQL's, not the journal's: it stays; nothing is admitted.
            self.lifecycle.read_only()
            log.warning("%d streams aborted, unbilled; the core takes no more requests", aborted)
            return
        try:
            durable = await asyncio.to_thread(self.journal.read_durable)
        except JournalError as exc:
            log.critical("cannot read the journal back after the failed write: %s", exc)
            return
        self.ledger.rollback(durable.state or LedgerState(), durable.records)
        self.lifecycle.read_only()
        log.warning(
            "ledger rolled back to the journal on disk (record %d); %d streams aborted, unbilled",
            durable.last_seq,
            aborted,
        )

    def drain_on_signals(self) -> None:
        """SIGTERM/SIGINT drain once; a second signal exits at once (the journal is a SQLite
        WAL, so an exit at any instant leaves it consistent)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._background(self.reload_rate_card()))

    async def _start_ops(self) -> None:
        """The operators' HTTP port (/metrics, /health) and the gauges read at scrape time."""
        telemetry = self.telemetry
        telemetry.gauge(
            "corvex_active_streams",
            "Chat streams in flight.",
            lambda: self.lifecycle.active_streams,
        )
        telemetry.gauge(
            "corvex_held_usd",
            "Money held by requests in flight, USD.",
            lambda: self.ledger.held_total_nano() / NANO_PER_USD,
        )
        telemetry.labelled_gauge(
            "corvex_engine_running",
            "Requests an engine is generating for.",
            "model",
            lambda: {e.model_id: e.stats().running for e in self.catalogue.engines},
        )
        telemetry.labelled_gauge(
            "corvex_engine_waiting",
            "Requests queued in an engine.",
            "model",
            lambda: {e.model_id: e.stats().waiting for e in self.catalogue.engines},
        )
        if self.config.metrics_port < 0:
            return
        self._ops, self.metrics_port = await ops_http.start(
            telemetry, self.health_details, self.config.metrics_host, self.config.metrics_port
        )
        log.info("metrics on http://%s:%d/metrics", self.config.metrics_host, self.metrics_port)

    def health_details(self) -> dict[str, Any]:
        card = self.catalogue.rate_card
        journal = self.journal
        reserved_engines = self.reserved.engines()
        return {
            "serving": self.lifecycle.accepting,
            "reason": self.lifecycle.refusal,
            "rate_card": {
                "version": card.version,
                "digest": card.digest,
                "last_reload_error": self.last_reload_error or None,
            },
            "engines": {
                e.model_id: {
                    "kind": e.kind,
                    "state": e.state.value,
                    "running": e.stats().running,
                    "waiting": e.stats().waiting,
                }
                for e in self.catalogue.engines
            },
            "journal": (
                {
                    "enabled": True,
                    "last_record": journal.last_seq,
                    "failure": str(journal.failure) if journal.failure else None,
                }
                if journal is not None
                else {"enabled": False}
            ),
            "active_streams": self.lifecycle.active_streams,
            "ledger": self.cluster.health() if self.cluster else {"backend": "journal"},
            "reserved": {
                view.endpoint.id: {
                    "model": view.endpoint.model_id,
                    "status": view.status.value,
                    "replicas": view.endpoint.replicas,
                    "engines": [
                        {"state": e.state.value, "running": e.stats().running}
                        for e in reserved_engines.get(view.endpoint.id, [])
                    ],
                }
                for view in self.reserved.views()
            },
        }

    async def reload_rate_card(self) -> bool:
        """Loads the rate card file again (SIGHUP). A valid new card prices the next request;
        requests already admitted settle at the rates they were admitted with. An invalid one
        leaves the current card in force and is reported in /health and the log."""
        async with self._reload_lock:
            current = self.catalogue.rate_card
            try:
                card = await asyncio.to_thread(load_rate_card, self.config.rate_card)
                if card.digest == current.digest:
                    log.info("rate card unchanged (version %s)", card.version)
                    return True
                if card.version == current.version:
                    raise RateCardError(
                        f"{self.config.rate_card}: the card changed but its version is still "
                        f"{card.version}; give every change a new version"
                    )
                CapacityPool.from_config(self.config, card)  # the pool still fits the card
                self.reserved.check_card(card)
                added = build_engines(
                    self.config, [m for m in card.models if not self.catalogue.has_engine(m.id)]
                )
                await asyncio.gather(*(engine.start() for engine in added))
            except (ValueError, EngineError, StartupError) as exc:
                self.last_reload_error = str(exc)
                self.telemetry.reload_failures.inc()
                log.error("rate card reload refused; %s stays in force: %s", current.version, exc)
                return False
            for engine in self.catalogue.replace(card, added):
                self._background(self._retire(engine))
            self.last_reload_error = ""
            log.info("rate card %s is in force (was %s)", card.version, current.version)
            return True

    async def _retire(self, engine: Engine) -> None:
        """Shuts down the engine of a model that left the rate card once it is idle."""
        # Polling: the seam has no "idle" event, and retirement is rare and unhurried.
        while engine.stats().running or engine.stats().waiting:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        if self.catalogue.retire(engine):
            await engine.shutdown()
            log.info("engine of %s retired: the model left the rate card", engine.model_id)

    def _background(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Runs a task the core owns; close() cancels what is still running."""
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._draining is not None:
            log.warning("second %s: exiting now without draining", sig.name)
            os._exit(1)
        log.info("%s: draining (grace %.0fs)", sig.name, self.config.drain_grace_s)
        self._draining = asyncio.create_task(self.drain())

    async def drain(self) -> None:
        """Stops admitting, lets streams finish within the grace period, aborts (and so
        settles) the rest, flushes the journal, and stops."""
        self.lifecycle.draining("The core is shutting down; retry shortly.")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if not await self.lifecycle.wait_idle(self.config.drain_grace_s):
            aborted = await self.lifecycle.abort_all()
            log.warning("grace period over: aborted %d streams", aborted)
            await self.lifecycle.wait_idle(5.0)
        await self.server.stop(grace=1.0)
        await self.close()
        self._stopped.set()

    async def close(self) -> None:
        if self._ops is not None:
            await self._ops.cleanup()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.reloader.close()
        await self.reserved.close()
        await self.alerter.close()
        await asyncio.gather(*(e.shutdown() for e in self.catalogue.engines))
        if self.cluster is not None:
            await self.cluster.close()
        if self.journal is not None:
            await self.journal.close()
            log.info("core stopped; journal flushed at record %d", self.journal.last_seq)

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(config: CoreConfig, *, ready_file: str | None = None) -> None:
    # Whatever the core creates is its own (the journal makes its files 0600 regardless).
    os.umask(0o077)
    core = Core(config)
    core.drain_on_signals()
    try:
        await core.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await core.server.stop(grace=0)
            if core.journal is not None:
                await core.journal.close()
        raise
    if ready_file:
        readyfile.write(ready_file, grpc_port=core.port, metrics_port=core.metrics_port)
    await core.wait()
