"""Auto-reload in a cluster: a workspace whose balance fell below its threshold is reloaded
once, however many cores notice.

A core looks after the charges of a workspace with auto-reload commit (at most once a second
per workspace). The reload's idempotency key names the workspace's latest invoice, so every
core that sees the same balance makes the same key: the payment provider takes the payment
once (its contract) and the ledger credits it once (the key is unique per workspace). A failed
payment is recorded on the workspace and tried again after a backoff, doubled each time.
Serving never waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

from corvex.money import format_usd
from corvex_core.cluster.link import Link
from corvex_core.cluster.mirror import MirrorLedger
from corvex_core.payments import PaymentError, PaymentProvider
from corvex_core.pg import db
from corvex_core.pg.accounts import AccountStore

log = logging.getLogger(__name__)

CHECK_EVERY_S: Final = 1.0


class ClusterReloader:
    def __init__(
        self,
        accounts: AccountStore,
        ledger: MirrorLedger,
        link: Link,
        provider: PaymentProvider,
        *,
        retry_initial_s: float,
        retry_max_s: float,
    ) -> None:
        self._accounts = accounts
        self._ledger = ledger
        self._link = link
        self._provider = provider
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._next_check: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def check(self, workspace_id: str) -> None:
        """After charges of the workspace committed; synchronous and cheap."""
        ws = self._ledger.mirrored_workspace(workspace_id)
        if ws is None or ws.auto_reload is None or workspace_id in self._tasks:
            return
        now = time.monotonic()
        if self._next_check.get(workspace_id, 0.0) > now:
            return
        self._next_check[workspace_id] = now + CHECK_EVERY_S
        task = asyncio.ensure_future(self._reload(workspace_id))
        self._tasks[workspace_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(workspace_id, None))

    async def _reload(self, workspace_id: str) -> None:
        try:
            with db.purpose("reload"):
                await self._attempt(workspace_id)
        except Exception as exc:  # the next check tries again
            log.warning("auto-reload of %s did not run: %s", workspace_id, exc)

    async def _attempt(self, workspace_id: str) -> None:
        row = await self._link.call(self._accounts.workspace(workspace_id))
        settings = row.auto_reload
        if settings is None or row.balance_nano >= settings.threshold_nano:
            self._backoff.pop(workspace_id, None)
            return
        last = await self._link.call(self._accounts.last_invoice_number(workspace_id))
        idempotency_key = f"auto-reload:{workspace_id}:after-INV-{last:06d}"
        try:
            await self._provider.charge(workspace_id, settings.amount_nano, idempotency_key)
        except PaymentError as exc:
            delay = self._backoff.get(workspace_id, self._retry_initial_s)
            self._backoff[workspace_id] = min(delay * 2, self._retry_max_s)
            self._next_check[workspace_id] = time.monotonic() + delay
            log.warning("auto-reload of $%s for %s failed: %s; retrying in %.0fs",
                        format_usd(settings.amount_nano), workspace_id, exc, delay)  # fmt: skip
            await self._link.call(self._accounts.record_auto_reload_failure(workspace_id, str(exc)))
            return
        _, replayed = await self._link.call(
            self._accounts.top_up(
                workspace_id, settings.amount_nano, "auto_reload", idempotency_key
            )
        )
        self._backoff.pop(workspace_id, None)
        if not replayed:
            log.info("auto-reload added $%s to %s", format_usd(settings.amount_nano), workspace_id)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
