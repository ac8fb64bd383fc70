"""Auto-reload: buying credits through a payment provider when a balance runs low.

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
import logging
import secrets
from typing import Final, Protocol

from corvex.money import format_usd
from corvex_core import errors
from corvex_core.journal import Journal, JournalError
from corvex_core.ledger import Ledger
from corvex_core.records import TopUpMethod
from corvex_core.state import AutoReload

log = logging.getLogger(__name__)

# Attempts of one reload before giving up (with the default backoff, about half an hour).
MAX_ATTEMPTS: Final = 10


class PaymentError(Exception):
    """The provider declined or failed; the message is recorded on the workspace."""


class PaymentProvider(Protocol):
    name: str

    async def charge(self, workspace_id: str, amount_nano: int, idempotency_key: str) -> None:
        """Takes the payment, or raises PaymentError. Retried with the same idempotency key,
        it must not take the payment twice."""
        ...


class SimulatedProvider:
    """Accepts every payment at once. For development and demos; it moves no real money."""

    name = "simulated"

    async def charge(self, workspace_id: str, amount_nano: int, idempotency_key: str) -> None:
        log.info("simulated payment of $%s for %s accepted", format_usd(amount_nano), workspace_id)


class NoProvider:
    """No payment processor is configured: auto-reload can be set, but every attempt fails."""

    name = "none"

    async def charge(self, workspace_id: str, amount_nano: int, idempotency_key: str) -> None:
        raise PaymentError("no payment provider is configured on this core")


def make_provider(name: str) -> PaymentProvider:
    if name == "simulated":
        return SimulatedProvider()
    if name == "none":
        return NoProvider()
    raise ValueError(f"unknown payment provider {name!r}")


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
    ) -> None:
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
