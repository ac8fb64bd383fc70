"""Charges on their way from a core to PostgreSQL: group-committed, exactly once.

Settled requests append their charge (with the lease that paid for it) without waiting; one
task commits whatever has accumulated, one transaction per lease (`LeaseStore.charge`, many
charges each: group commit, no added wait), leases in parallel and each lease's batches in
order. `confirm(charge_id)` resolves once that charge is committed: with `ledger.charges:
postgres` a request's final chunk waits for it, so a charge a client was shown is in
PostgreSQL. A batch whose outcome is unknown (the connection dropped around the COMMIT) is
sent again as it was: charge ids make the retry count once. A batch refused because its lease
is gone (lapsed and swept) cannot be paid: its charges are lost, and counted as such. Credit a
core gives back near $0 rides with the next batch of its lease, never with a retry.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from typing import Final

from corvex_core.journal import JournalError
from corvex_core.pg import db
from corvex_core.pg.leases import (
    MAX_CHARGES_PER_BATCH,
    Charge,
    LeaseExceeded,
    LeaseGone,
    LeaseStore,
)
from corvex_core.records import Charged

log = logging.getLogger(__name__)

# Charges waiting for PostgreSQL beyond which admissions are refused (the ledger is not
# keeping up): at most one per request in flight when charges wait for their commit.
MAX_BACKLOG: Final = 100_000
# Leases whose batches are committed at once (each takes a pool connection).
MAX_PARALLEL: Final = 4
RETRY_INITIAL_S: Final = 0.2
RETRY_MAX_S: Final = 2.0


class ChargeUnconfirmed(JournalError):
    """PostgreSQL did not confirm a charge in time. It stays queued and is recorded when the
    ledger is back, unless its lease lapses first."""


class ChargeLost(JournalError):
    """A charge could not be recorded: its lease had lapsed and was swept. It is not billed."""


def to_pg(charge: Charged, token_lease_id: int | None) -> Charge:
    return Charge(
        charge_id=charge.charge_id,
        request_id=charge.request_id,
        key_id=charge.key_id,
        model=charge.model,
        prompt_tokens=charge.prompt_tokens,
        completion_tokens=charge.completion_tokens,
        cached_prompt_tokens=charge.cached_prompt_tokens,
        cost_nano=charge.cost_nano,
        rate_card_version=charge.rate_card_version,
        at=dt.datetime.fromtimestamp(charge.at_ms / 1000, dt.UTC),
        token_lease_id=token_lease_id,
    )


class ChargeShipper:
    """See the module docstring. `run()` is the committing task."""

    def __init__(
        self,
        store: LeaseStore,
        *,
        on_down: Callable[[BaseException], None],
        on_committed: Callable[[str, int, float], None] | None = None,
        on_lost: Callable[[Charge], None] | None = None,
        on_settled: Callable[[str], None] | None = None,
    ) -> None:
        self._store = store
        self._on_down = on_down
        # (workspace id, charges, seconds) after each committed batch; each lost charge.
        self._on_committed = on_committed
        self._on_lost = on_lost
        # Told each charge id once its fate is known (committed or lost).
        self._on_settled = on_settled
        self._queued: dict[int, list[tuple[str, Charge]]] = {}
        self._retry: dict[int, list[tuple[str, Charge]]] = {}
        self._give_back: dict[int, int] = {}
        self._give_back_tokens: dict[int, int] = {}
        self._futures: dict[str, asyncio.Future[None]] = {}
        self._in_flight: set[int] = set()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.backlog = 0
        self.lost = 0

    # ---- appending (synchronous, on the event loop) ------------------------------------------

    def append(
        self, workspace_id: str, charge: Charged, lease_id: int, token_lease_id: int | None
    ) -> None:
        assert charge.charge_id not in self._futures, charge.charge_id
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(self._forget(charge.charge_id))
        self._futures[charge.charge_id] = future
        self._queued.setdefault(lease_id, []).append((workspace_id, to_pg(charge, token_lease_id)))
        self.backlog += 1
        self._kick()

    def give_back(self, lease_id: int, nano: int) -> None:
        """Returns `nano` of a lease's credit with its next batch (the core already stopped
        counting it as its own)."""
        assert nano > 0
        self._give_back[lease_id] = self._give_back.get(lease_id, 0) + nano
        self._kick()

    def give_back_tokens(self, token_lease_id: int, tokens: int) -> None:
        assert tokens > 0
        self._give_back_tokens[token_lease_id] = (
            self._give_back_tokens.get(token_lease_id, 0) + tokens
        )
        self._kick()

    def busy(self, lease_id: int) -> bool:
        """Whether charges of this lease are still on their way (it must not be released)."""
        return lease_id in self._queued or lease_id in self._retry or lease_id in self._in_flight

    def busy_tokens(self, token_lease_id: int) -> bool:
        if token_lease_id in self._give_back_tokens:
            return True
        return any(
            c.token_lease_id == token_lease_id
            for batches in (self._queued, self._retry)
            for batch in batches.values()
            for _, c in batch
        )

    # ---- waiting -------------------------------------------------------------------------

    async def confirm(self, charge_id: str, timeout_s: float) -> None:
        """Returns once the charge is in PostgreSQL; raises ChargeLost if it never will be,
        ChargeUnconfirmed if it is not there within `timeout_s`."""
        future = self._futures.get(charge_id)
        if future is None:
            return  # committed (and forgotten) already
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            raise ChargeUnconfirmed(
                "The ledger database did not confirm this request's charge in time. It stays "
                "queued and is billed once the database is back; retry later."
            ) from None

    async def drain(self, timeout_s: float) -> bool:
        """Waits until nothing is left to commit. Returns False if time ran out."""
        try:
            await asyncio.wait_for(self._drained(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _drained(self) -> None:
        while self._pending():
            self._idle.clear()
            self._kick()
            await self._idle.wait()

    # ---- committing ------------------------------------------------------------------------

    async def run(self) -> None:
        delay = RETRY_INITIAL_S
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending():
                self._idle.set()
                continue
            try:
                reachable = await self._pass()
            except Exception:
                log.critical("a pass of the charge shipper failed", exc_info=True)
                reachable = False
            if reachable:
                delay = RETRY_INITIAL_S
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            if self._pending():
                self._kick()
            else:
                self._idle.set()

    def _pending(self) -> bool:
        return bool(self._queued or self._retry or self._give_back or self._give_back_tokens)

    def _kick(self) -> None:
        self._wake.set()

    async def _pass(self) -> bool:
        """Commits one batch per lease with work. Returns False if the database could not be
        reached."""
        leases = sorted(set(self._queued) | set(self._retry) | set(self._give_back))
        # -1 holds charges whose lease is gone and whose fate is still to be looked up.
        limit = asyncio.Semaphore(MAX_PARALLEL)
        results = await asyncio.gather(*(self._ship(lease_id, limit) for lease_id in leases))
        reachable = all(results)
        if reachable and self._give_back_tokens:
            reachable = await self._ship_tokens()
        return reachable

    def _take(self, lease_id: int) -> tuple[list[tuple[str, Charge]], int]:
        """The next batch of a lease: a retry as it was (give-backs wait), else new charges
        with the credit to give back."""
        retry = self._retry.pop(lease_id, None)
        if retry is not None:
            return retry, 0
        queued = self._queued.pop(lease_id, [])
        batch, rest = queued[:MAX_CHARGES_PER_BATCH], queued[MAX_CHARGES_PER_BATCH:]
        if rest:
            self._queued[lease_id] = rest
        return batch, self._give_back.pop(lease_id, 0)

    async def _ship(self, lease_id: int, limit: asyncio.Semaphore) -> bool:
        async with limit:
            batch, give_back = self._take(lease_id)
            if not batch and not give_back:
                return True
            charges = [c for _, c in batch]
            self._in_flight.add(lease_id)
            started = asyncio.get_running_loop().time()
            try:
                with db.purpose("charge"):
                    await self._store.charge(lease_id, charges, give_back_nano=give_back)
            except db.UNREACHABLE as exc:
                # Unknown outcome: the same charges go again, without the give-back (which is
                # not idempotent; the credit stays on the lease until it ends).
                if batch:
                    self._retry[lease_id] = batch
                self._on_down(exc)
                return False
            except Exception:
                # Never seen; if it happens the charges are kept and tried again, never lost.
                log.critical("charging lease %d failed unexpectedly", lease_id, exc_info=True)
                if batch:
                    self._retry[lease_id] = batch
                return False
            except LeaseGone:
                await self._settle_gone(batch)
                return True
            except LeaseExceeded:
                log.critical("charges of lease %d exceed it: a core admitted beyond its lease",
                             lease_id, exc_info=True)  # fmt: skip
                self._lost(batch)
                return True
            finally:
                self._in_flight.discard(lease_id)
            elapsed = asyncio.get_running_loop().time() - started
            self._committed(batch)
            if batch and self._on_committed is not None:
                self._on_committed(batch[0][0], len(batch), elapsed)
            return True

    async def _ship_tokens(self) -> bool:
        gives, self._give_back_tokens = self._give_back_tokens, {}
        for token_lease_id, tokens in sorted(gives.items()):
            try:
                with db.purpose("charge"):
                    await self._store.shrink_tokens(token_lease_id, tokens)
            except db.UNREACHABLE as exc:
                self._on_down(exc)  # not retried: the tokens stay on the lease until it ends
                return False
            except LeaseExceeded:
                log.critical("token lease %d gave back more than it holds", token_lease_id)
            except Exception:
                log.critical("giving back tokens of lease %d failed", token_lease_id,
                             exc_info=True)  # fmt: skip
        return True

    async def _settle_gone(self, batch: list[tuple[str, Charge]]) -> None:
        """The lease is gone: charges a lost acknowledgement hid are in; the rest are lost."""
        try:
            with db.purpose("charge"):
                known = await self._store.known_charges([c.charge_id for _, c in batch])
        except db.UNREACHABLE as exc:
            self._on_down(exc)
            for workspace_id, charge in batch:
                # Ask again later: to the lease-less retry, which will settle it the same way.
                self._retry.setdefault(-1, []).append((workspace_id, charge))
            return
        self._committed([(w, c) for w, c in batch if c.charge_id in known])
        self._lost([(w, c) for w, c in batch if c.charge_id not in known])

    def _committed(self, batch: list[tuple[str, Charge]]) -> None:
        for _, charge in batch:
            self.backlog -= 1
            if self._on_settled is not None:
                self._on_settled(charge.charge_id)
            future = self._futures.get(charge.charge_id)
            if future is not None and not future.done():
                future.set_result(None)

    def _lost(self, batch: list[tuple[str, Charge]]) -> None:
        for _, charge in batch:
            self.backlog -= 1
            self.lost += 1
            if self._on_settled is not None:
                self._on_settled(charge.charge_id)
            log.error(
                "charge %s (request %s, %d nano-USD) cannot be recorded: its lease is gone; "
                "it is not billed",
                charge.charge_id, charge.request_id, charge.cost_nano,
            )  # fmt: skip
            if self._on_lost is not None:
                self._on_lost(charge)
            future = self._futures.get(charge.charge_id)
            if future is not None and not future.done():
                future.set_exception(
                    ChargeLost(
                        "This request's charge could not be recorded (the core's lease on the "
                        "workspace lapsed while the ledger database was away); it was not "
                        "billed."
                    )
                )

    def _forget(self, charge_id: str) -> Callable[[asyncio.Future[None]], None]:
        def forget(future: asyncio.Future[None]) -> None:
            self._futures.pop(charge_id, None)
            if not future.cancelled():
                future.exception()  # retrieved: nobody may be waiting for it any more

        return forget
