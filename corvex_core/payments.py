"""Buying credits through a payment provider: a customer's checkout, and auto-reload when a
balance runs low.

A checkout is the provider's approval step: `Checkouts.start` asks the provider for one (the
simulated provider approves at once; a real one hands back the page where the customer pays),
and `Checkouts.complete` confirms the payment with the provider and credits it once, under an
idempotency key of the checkout (so a double submit, or a retry after a restart, credits once).
Pending checkouts live in memory (bounded, expiring): a restart forgets an unfinished one, never
a credited one.

The provider is a seam: `simulated` (always succeeds; development and tests) and `none`
(every attempt fails and is recorded) ship here, and a real processor plugs in behind the same
protocol. At most one reload is in flight per workspace; failures are recorded on the
workspace and retried with exponential backoff, at most MAX_ATTEMPTS times: then the reloader
gives up on that workspace (its error says so) until its auto-reload settings are set again or
credits are added. Serving never waits for a reload: requests are admitted against the balance
as it is.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import msgspec

from corvex.money import format_usd
from corvex.quoting import quote
from corvex_core import errors
from corvex_core.journal import Journal, JournalError
from corvex_core.ledger import Ledger
from corvex_core.records import TopUpMethod
from corvex_core.state import AutoReload, Invoice, idempotency_slot

log = logging.getLogger(__name__)

# Attempts of one reload before giving up (with the default backoff, about half an hour).
MAX_ATTEMPTS: Final = 10


class PaymentError(Exception):
    """The provider declined or failed; the message is recorded on the workspace."""


class ProviderCheckout(msgspec.Struct, frozen=True):
    """A checkout the provider opened: its id there, and where the customer approves it
    ("" when the edge shows its own approval step, as for the simulated provider)."""

    provider_id: str
    approve_url: str


class PaymentProvider(Protocol):
    name: str

    async def charge(self, workspace_id: str, amount_nano: int, idempotency_key: str) -> None:
        """Takes the payment, or raises PaymentError. Retried with the same idempotency key,
        it must not take the payment twice."""
        ...

    async def start_checkout(
        self, workspace_id: str, amount_nano: int, idempotency_key: str
    ) -> ProviderCheckout:
        """Opens a checkout for the customer to approve, or raises PaymentError."""
        ...

    async def confirm_checkout(self, checkout: ProviderCheckout) -> None:
        """Returns once the checkout's payment is taken; raises PaymentError if it was not
        (declined, abandoned). Called again for the same checkout, it takes nothing more."""
        ...


class SimulatedProvider:
    """Accepts every payment at once. For development and demos; it moves no real money."""

    name = "simulated"

    async def charge(self, workspace_id: str, amount_nano: int, idempotency_key: str) -> None:
        log.info("simulated payment of $%s for %s accepted", format_usd(amount_nano), workspace_id)

    async def start_checkout(
        self, workspace_id: str, amount_nano: int, idempotency_key: str
    ) -> ProviderCheckout:
        return ProviderCheckout("sim_" + secrets.token_hex(8), approve_url="")

    async def confirm_checkout(self, checkout: ProviderCheckout) -> None:
        log.info("simulated checkout %s approved", checkout.provider_id)


class NoProvider:
    """No payment processor is configured: auto-reload can be set, but every attempt fails."""

    name = "none"

    async def charge(self, workspace_id: str, amount_nano: int, idempotency_key: str) -> None:
        raise PaymentError("no payment provider is configured on this core")

    async def start_checkout(
        self, workspace_id: str, amount_nano: int, idempotency_key: str
    ) -> ProviderCheckout:
        raise PaymentError("no payment provider is configured on this core")

    async def confirm_checkout(self, checkout: ProviderCheckout) -> None:
        raise PaymentError("no payment provider is configured on this core")


def make_provider(name: str) -> PaymentProvider:
    if name == "simulated":
        return SimulatedProvider()
    if name == "none":
        return NoProvider()
    raise ValueError(f"unknown payment provider {name!r}")


Durable = Callable[[], Awaitable[None]]


class Checkout(msgspec.Struct):
    id: str
    workspace_id: str
    amount_nano: int
    created_ms: int
    provider: ProviderCheckout
    invoice: Invoice | None = None

    @property
    def idempotency_key(self) -> str:
        """The ledger's idempotency key of its credits: one credit per checkout."""
        return f"checkout:{self.id}"


class Checkouts:
    """Pending and recent checkouts, in memory: at most MAX_PENDING, each for at most
    TTL_MS (older ones are forgotten first)."""

    MAX_PENDING: Final = 10_000
    TTL_MS: Final = 3_600_000

    def __init__(self, ledger: Ledger, provider: PaymentProvider, durable: Durable) -> None:
        self._ledger = ledger
        self._provider = provider
        self._durable = durable
        self._by_id: collections.OrderedDict[str, Checkout] = collections.OrderedDict()
        self._by_idempotency: dict[str, str] = {}

    @property
    def provider_name(self) -> str:
        return self._provider.name

    async def start(self, workspace_id: str, amount_nano: int, idempotency_key: str) -> Checkout:
        self._ledger.workspace(workspace_id)
        self._expire()
        slot = idempotency_slot(workspace_id, idempotency_key)
        existing = self._by_idempotency.get(slot)
        if existing is not None and existing in self._by_id:
            checkout = self._by_id[existing]
            if checkout.amount_nano != amount_nano:
                raise errors.InvalidRequest(
                    "idempotency_key was used for a checkout of another amount",
                    param="idempotency_key",
                )
            return checkout
        try:
            opened = await self._provider.start_checkout(workspace_id, amount_nano, idempotency_key)
        except PaymentError as exc:
            raise errors.InvalidRequest(f"The payment could not start: {exc}") from exc
        checkout = Checkout(
            id="chk_" + secrets.token_hex(12),
            workspace_id=workspace_id,
            amount_nano=amount_nano,
            created_ms=self._ledger.now_ms(),
            provider=opened,
        )
        self._by_id[checkout.id] = checkout
        self._by_idempotency[slot] = checkout.id
        return checkout

    def get(self, workspace_id: str, checkout_id: str) -> Checkout:
        checkout = self._by_id.get(checkout_id)
        if checkout is None or checkout.workspace_id != workspace_id:
            raise errors.NotFound(
                f"No checkout {quote(checkout_id)}: it expired, or the core restarted "
                "before it was completed. Start a new one; nothing was charged for it."
            )
        return checkout

    async def complete(self, workspace_id: str, checkout_id: str) -> tuple[Invoice, bool]:
        """Confirms the payment and credits it once. Returns (invoice, replayed)."""
        checkout = self.get(workspace_id, checkout_id)
        if checkout.invoice is not None:
            return checkout.invoice, True
        try:
            await self._provider.confirm_checkout(checkout.provider)
        except PaymentError as exc:
            raise errors.InvalidRequest(f"The payment was not taken: {exc}") from exc
        invoice, replayed = self._ledger.add_credits(
            workspace_id, checkout.amount_nano, TopUpMethod.MANUAL, checkout.idempotency_key
        )
        checkout.invoice = invoice
        await self._durable()
        return invoice, replayed

    def _expire(self) -> None:
        horizon = self._ledger.now_ms() - self.TTL_MS
        while self._by_id:
            oldest = next(iter(self._by_id.values()))
            if oldest.created_ms > horizon and len(self._by_id) < self.MAX_PENDING:
                break
            self._by_id.popitem(last=False)
            self._by_idempotency = {k: v for k, v in self._by_idempotency.items() if v != oldest.id}


class AutoReloader:
    """Starts at most one reload per workspace whose balance fell below its threshold."""

    def __init__(
        self,
        ledger: Ledger,
        journal: Journal | None,
        provider: PaymentProvider,
        *,
        retry_initial_s: float,
        retry_max_s: float,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self._on_failure = on_failure
        self._ledger = ledger
        self._journal = journal
        self._provider = provider
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Workspaces given up on: their settings object and invoice count then. A new
        # AutoReloadSet makes a new settings object and a top-up a new invoice, and either
        # lets reloads start again. At most one entry per workspace.
        self._given_up: dict[str, tuple[AutoReload, int]] = {}

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def check(self, workspace_id: str) -> None:
        """Called after every charge; synchronous and cheap when nothing is needed."""
        if workspace_id in self._tasks:
            return
        settings = self._ledger.needs_auto_reload(workspace_id)
        if settings is None:
            self._given_up.pop(workspace_id, None)
            return
        given_up = self._given_up.get(workspace_id)
        if given_up is not None:
            ws = self._ledger.workspace(workspace_id)
            if given_up[0] is ws.auto_reload and given_up[1] == len(ws.invoice_numbers):
                return
            del self._given_up[workspace_id]
        task = asyncio.create_task(self._reload(workspace_id), name=f"auto-reload:{workspace_id}")
        self._tasks[workspace_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(workspace_id, None))

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _reload(self, workspace_id: str) -> None:
        try:
            await self._attempts(workspace_id)
        except JournalError:
            return  # the core is read-only now; nothing more can be recorded

    async def _attempts(self, workspace_id: str) -> None:
        delay = self._retry_initial_s
        # One idempotency key per reload, reused by its retries: a provider that took the money
        # but timed out is not charged twice, and the ledger credits the reload once.
        idempotency_key = f"auto-reload:{workspace_id}:{secrets.token_hex(8)}"
        for attempt in range(1, MAX_ATTEMPTS + 1):
            settings = self._ledger.needs_auto_reload(workspace_id)
            if settings is None:
                return
            try:
                await self._provider.charge(workspace_id, settings.amount_nano, idempotency_key)
            except PaymentError as exc:
                self._failed(workspace_id, settings, str(exc), attempt, delay)
                if attempt == MAX_ATTEMPTS:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
                continue
            try:
                self._ledger.add_credits(
                    workspace_id, settings.amount_nano, TopUpMethod.AUTO_RELOAD, idempotency_key
                )
            except errors.CorvexError as exc:
                log.error("auto-reload credit of %s refused: %s", workspace_id, exc.message)
                return
            if self._journal is not None:
                await self._journal.sync_point()
            log.info("auto-reload added $%s to %s", format_usd(settings.amount_nano), workspace_id)
            return

    def _failed(
        self, workspace_id: str, settings: AutoReload, error: str, attempt: int, delay_s: float
    ) -> None:
        amount = format_usd(settings.amount_nano)
        if attempt < MAX_ATTEMPTS:
            log.warning(
                "auto-reload of $%s for %s failed (attempt %d of %d): %s; retrying in %.0fs",
                amount, workspace_id, attempt, MAX_ATTEMPTS, error, delay_s,
            )  # fmt: skip
            self._ledger.record_auto_reload_failure(workspace_id, error)
            self._failure_seen(workspace_id)
            return
        log.error("auto-reload of $%s for %s given up after %d attempts: %s",
                  amount, workspace_id, attempt, error)  # fmt: skip
        self._ledger.record_auto_reload_failure(
            workspace_id,
            f"{error} (gave up after {attempt} attempts; set auto-reload again or add credits)",
        )
        ws = self._ledger.workspace(workspace_id)
        assert ws.auto_reload is not None
        self._given_up[workspace_id] = (ws.auto_reload, len(ws.invoice_numbers))
        self._failure_seen(workspace_id)

    def _failure_seen(self, workspace_id: str) -> None:
        if self._on_failure is not None:
            self._on_failure(workspace_id)
