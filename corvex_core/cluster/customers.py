"""Customers in a cluster (issue 16): what lets the web app work on every core, with
PostgreSQL (pg/customers.py) as the authority for users, sessions, claims, checkouts, alert
settings and the recent-request log.

- `ClusterDirectory` is the access rules' `Directory` over PostgreSQL: a session is looked up
  there on every call that presents one, so a session made on one core is accepted by every
  other at once, and one signed out is refused everywhere from the moment it committed.
- `SharedActivity` sends each ended metered call to the shared request log (group commit, in
  the background: a request never waits for it), where every core reads a workspace's log.
- `ClusterAlerts` sends each alert once however many cores notice it: the alert kinds in force
  are a column moved by compare-and-set, and only the core whose update moved it sends the
  webhooks of the kinds that came into force (`alerts.Alerter` delivers them).
- `ClusterCheckouts` is `payments.Checkouts` over PostgreSQL: a checkout started on one core
  can be completed on another, and credited once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import time
from collections.abc import Collection
from typing import Final

from corvex.quoting import quote
from corvex_core import alerts, errors
from corvex_core.access import Resource
from corvex_core.activity import Activity, RecentRequest
from corvex_core.alerts import Alerter
from corvex_core.cluster.link import Link
from corvex_core.cluster.mirror import MirrorLedger
from corvex_core.cluster.sync import ms
from corvex_core.config import CustomersConfig
from corvex_core.invoices import parse_invoice_number
from corvex_core.ledger import hash_secret, invalid_session
from corvex_core.payments import PaymentError, PaymentProvider, ProviderCheckout
from corvex_core.pg import db
from corvex_core.pg.accounts import WorkspaceRow
from corvex_core.pg.customers import CheckoutRow, CustomerStore, LoggedRequest
from corvex_core.state import Invoice, Session, Workspace

log = logging.getLogger(__name__)

# A workspace's alerts are looked at after its charges commit at most this often.
ALERTS_EVERY_S: Final = 1.0
# Ended calls waiting for the request log, and how many one statement stores.
MAX_QUEUED: Final = 10_000
MAX_BATCH: Final = 500


def workspace_of(row: WorkspaceRow, now: dt.datetime) -> Workspace:
    """A workspace as the wire (and the alerts) see it, from PostgreSQL's row, as of `now`'s
    month."""
    month = db.utc_month(now)
    spend = row.month_spend_nano if month <= row.month else 0
    return Workspace(
        id=row.id,
        name=row.name,
        created_ms=ms(row.created_at),
        balance_nano=row.balance_nano,
        spend_cap_nano=row.spend_cap_nano,
        month=max(month, row.month),
        month_spend_nano=spend,
        auto_reload=row.auto_reload,
        auto_reload_error=row.auto_reload_error,
        held_nano=row.leased_nano,
        owner_user_id=row.owner_user_id,
        alerts=row.alerts,
    )


class ClusterDirectory:
    """The access rules' Directory (access.py) over PostgreSQL."""

    def __init__(self, store: CustomerStore, link: Link) -> None:
        self._store = store
        self._link = link

    async def session(self, token: str) -> Session:
        with db.purpose("auth"), self._link.watching():
            session = await self._store.session(hash_secret(token))
        if session is None:
            raise invalid_session()
        return session

    async def owned_workspaces(self, user_id: str) -> Collection[str]:
        with db.purpose("auth"), self._link.watching():
            return await self._store.owned_workspaces(user_id)

    async def workspace_of(self, kind: Resource, resource_id: str) -> str | None:
        store = self._store
        with db.purpose("auth"), self._link.watching():
            if kind is Resource.WORKSPACE:
                return resource_id if await store.workspace_exists(resource_id) else None
            if kind is Resource.KEY:
                return await store.workspace_of_key(resource_id)
            if kind is Resource.INVOICE:
                return await store.workspace_of_invoice(parse_invoice_number(resource_id))
            if kind is Resource.ENDPOINT:
                return await store.workspace_of_endpoint(resource_id)
        return None


class SharedActivity(Activity):
    """Activity whose entries go to PostgreSQL's request log instead of this core's memory.
    `run()` writes them; at most MAX_QUEUED wait (more are dropped and counted: the log is
    for people to read, it decides nothing)."""

    def __init__(self, store: CustomerStore, link: Link) -> None:
        super().__init__(store.now_ms)
        self._store = store
        self._link = link
        self._queue: list[LoggedRequest] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.dropped = 0

    def _keep(self, workspace_id: str, entry: RecentRequest) -> None:
        if len(self._queue) >= MAX_QUEUED:
            self.dropped += 1
            return
        self._queue.append(LoggedRequest(workspace_id, *_fields(entry)))
        self._idle.clear()
        self._wake.set()

    def recent(self, workspace_id: str, *, key_id: str = "", limit: int) -> list[RecentRequest]:
        raise AssertionError("in a cluster the log is read from PostgreSQL (recent_requests)")

    async def recent_requests(
        self, workspace_id: str, *, key_id: str, limit: int
    ) -> list[RecentRequest]:
        """The workspace's last requests on every core, newest first. Waits for this core's
        own to be written first, so a caller sees at least what this core served."""
        await self._idle.wait()
        with db.purpose("accounts"), self._link.watching():
            rows = await self._store.recent_requests(workspace_id, key_id=key_id, limit=limit)
        return [RecentRequest(*_fields(row)) for row in rows]

    async def written(self) -> None:
        """Returns once every entry recorded so far was written (or dropped)."""
        await self._idle.wait()

    async def run(self) -> None:
        """Writes what is queued, a batch per statement, as soon as it is there (group
        commit: what arrives during a write goes in the next). Returns only when cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                try:
                    with db.purpose("activity"):
                        await self._link.call(self._store.log_requests(batch))
                except Exception as exc:  # unreachable, or a refusal made of it
                    self.dropped += len(batch)
                    log.warning("%d entries of the request log were dropped: %s", len(batch), exc)
            self._idle.set()


def _fields(
    entry: RecentRequest | LoggedRequest,
) -> tuple[str, int, str, str, str, str, int, int, int]:
    return (
        entry.request_id,
        entry.at_ms,
        entry.key_id,
        entry.model,
        entry.rpc,
        entry.status,
        entry.prompt_tokens,
        entry.completion_tokens,
        entry.cost_nano,
    )


class ClusterAlerter(Alerter):
    """An Alerter whose last delivery error is kept in PostgreSQL (any core shows it)."""

    def __init__(
        self, store: CustomerStore, link: Link, ledger: MirrorLedger, config: CustomersConfig
    ) -> None:
        super().__init__(
            ledger,
            attempts=config.webhook_attempts,
            retry_initial_s=config.webhook_retry_initial_s,
            timeout_s=config.webhook_timeout_s,
            allow_private_addresses=config.webhook_allow_private_addresses,
        )
        self._store = store
        self._link = link

    def _record_error(self, workspace_id: str, error: str) -> None:
        super()._record_error(workspace_id, error)
        task = asyncio.ensure_future(self._write_error(workspace_id, error))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_error(self, workspace_id: str, error: str) -> None:
        try:
            with db.purpose("accounts"):
                await self._link.call(self._store.set_delivery_error(workspace_id, error))
        except Exception as exc:
            log.warning("could not record the webhook error of %s: %s", workspace_id, exc)


class ClusterAlerts:
    """See the module docstring. `check` after charges commit (cheap, throttled, only for
    workspaces with a webhook); `check_now` after a change made on this core."""

    def __init__(
        self,
        store: CustomerStore,
        ledger: MirrorLedger,
        link: Link,
        alerter: Alerter,
        *,
        clock: db.Clock = db.utc_now,
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._link = link
        self.alerter = alerter
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._next: dict[str, float] = {}

    def check(self, workspace_id: str) -> None:
        """After charges of the workspace committed; synchronous and cheap."""
        ws = self._ledger.mirrored_workspace(workspace_id)
        if ws is None or not ws.alerts.webhook_url:
            return  # nothing to send: the banner is read from PostgreSQL's row
        if workspace_id in self._tasks:
            self._again.add(workspace_id)
            return
        task = asyncio.ensure_future(self._throttled(workspace_id))
        self._tasks[workspace_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(workspace_id, None))

    async def _throttled(self, workspace_id: str) -> None:
        while True:
            wait_s = self._next.get(workspace_id, 0.0) - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            self._next[workspace_id] = time.monotonic() + ALERTS_EVERY_S
            self._again.discard(workspace_id)
            try:
                await self.check_now(workspace_id)
            except Exception as exc:  # the next charge looks again
                log.warning("alerts of %s were not checked: %s", workspace_id, exc)
            if workspace_id not in self._again:
                return

    async def check_now(self, workspace_id: str) -> Workspace:
        """Reads the workspace, moves the kinds in force if they changed and, if this core
        moved them, sends the webhooks of the new ones. Returns the workspace read."""
        with db.purpose("accounts"):
            row = await self._link.call(self._store.alerts(workspace_id))
        ws = workspace_of(row.workspace, self._clock())
        found = alerts.active(ws)
        kinds = frozenset(a.kind.value for a in found)
        if kinds == row.in_force:
            return ws
        with db.purpose("accounts"):
            moved = await self._link.call(self._store.move_alerts(ws.id, row.in_force, kinds))
        if moved and ws.alerts.webhook_url:
            for alert in found:
                if alert.kind.value not in row.in_force:
                    self.alerter.send(ws, alert)
        return ws

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self.alerter.close()


class ClusterCheckouts:
    """Checkouts in PostgreSQL: started, read and completed on any core, credited once."""

    def __init__(self, store: CustomerStore, link: Link, provider: PaymentProvider) -> None:
        self._store = store
        self._link = link
        self._provider = provider

    @property
    def provider_name(self) -> str:
        return self._provider.name

    async def start(self, workspace_id: str, amount_nano: int, idempotency_key: str) -> CheckoutRow:
        with db.purpose("accounts"), self._link.watching():
            existing = await self._store.checkout_by_key(workspace_id, idempotency_key)
        if existing is None:
            try:
                opened = await self._provider.start_checkout(
                    workspace_id, amount_nano, idempotency_key
                )
            except PaymentError as exc:
                raise errors.InvalidRequest(f"The payment could not start: {exc}") from exc
            made = CheckoutRow(
                id="chk_" + secrets.token_hex(12),
                workspace_id=workspace_id,
                amount_nano=amount_nano,
                idempotency_key=idempotency_key,
                provider_id=opened.provider_id,
                approve_url=opened.approve_url,
                created_ms=self._store.now_ms(),
                invoice=None,
            )
            with db.purpose("accounts"), self._link.watching():
                existing = await self._store.add_checkout(made)
        if existing.amount_nano != amount_nano:
            raise errors.InvalidRequest(
                "idempotency_key was used for a checkout of another amount",
                param="idempotency_key",
            )
        return existing

    async def get(self, workspace_id: str, checkout_id: str) -> CheckoutRow:
        with db.purpose("accounts"), self._link.watching():
            checkout = await self._store.checkout(workspace_id, checkout_id)
        if checkout is None:
            raise errors.NotFound(
                f"No checkout {quote(checkout_id)}. Start a new one; nothing was charged for it."
            )
        return checkout

    async def complete(self, workspace_id: str, checkout_id: str) -> tuple[Invoice, bool]:
        """Confirms the payment and credits it once. Returns (invoice, replayed)."""
        checkout = await self.get(workspace_id, checkout_id)
        if checkout.invoice is not None:
            return checkout.invoice, True
        try:
            await self._provider.confirm_checkout(
                ProviderCheckout(checkout.provider_id, checkout.approve_url)
            )
        except PaymentError as exc:
            raise errors.InvalidRequest(f"The payment was not taken: {exc}") from exc
        with db.purpose("accounts"), self._link.watching():
            return await self._store.credit_checkout(checkout)


class ClusterCustomers:
    """What a core of a cluster needs for its customers, made once by the node."""

    def __init__(
        self,
        pool: db.Pool,
        ledger: MirrorLedger,
        link: Link,
        provider: PaymentProvider,
        config: CustomersConfig,
        *,
        clock: db.Clock = db.utc_now,
    ) -> None:
        self.store = CustomerStore(pool, clock=clock)
        self.directory = ClusterDirectory(self.store, link)
        self.activity = SharedActivity(self.store, link)
        self.alerts = ClusterAlerts(
            self.store, ledger, link, ClusterAlerter(self.store, link, ledger, config), clock=clock
        )
        self.checkouts = ClusterCheckouts(self.store, link, provider)

    async def close(self) -> None:
        await self.alerts.close()
