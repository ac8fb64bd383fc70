"""Keeping the mirror fresh: every account change another core makes reaches this one.

At start, and again every `resync_every_s`, every workspace and key is read from PostgreSQL
into the mirror. In between, a subscription to the `corvex_accounts` notices (pg/notify.py)
rereads what each change names as soon as it commits: in practice a few milliseconds after
the change's RPC returned on the other core. A notice is never stored, so the subscription's
loss (its connection dropped, or it fell behind) makes the mirror *stale*: the core then
refuses admissions until it has subscribed again and reloaded everything. So a core either
knows of a change within the time one notice and one read take, or refuses. A key unknown
here (made on another core a moment ago) is looked up once, at most a few at a time.

Also this core's share of each key's per-minute limits: its index among the live cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import ssl as ssl_module
import time
from collections.abc import Callable
from typing import Final

import msgspec

from corvex_core import errors
from corvex_core.cluster.link import Link, unavailable
from corvex_core.cluster.mirror import MirrorLedger
from corvex_core.cluster.supply import LeaseSupply
from corvex_core.pg import db
from corvex_core.pg.accounts import AccountStore, KeyRow, WorkspaceRow
from corvex_core.pg.notify import AccountChange, Subscription, SubscriptionLost
from corvex_core.records import KeyLimits
from corvex_core.state import ApiKey

log = logging.getLogger(__name__)

_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# How long the subscription may stay silent before its connection is checked.
PING_S: Final = 2.0
RECONNECT_INITIAL_S: Final = 0.1
RECONNECT_MAX_S: Final = 2.0
# Unknown keys: looked up at most this many at once, and a miss remembered this long (so a
# client sending a wrong key cannot make every request a database round trip).
MAX_LOOKUPS: Final = 4
MISS_TTL_S: Final = 1.0
MAX_MISSES: Final = 10_000


def ms(at: dt.datetime) -> int:
    return (at - _EPOCH) // dt.timedelta(milliseconds=1)


class Shares:
    """This core's share of a per-minute limit L among N live cores: L // N, and one more for
    the first L % N cores by id, so that the shares sum to L (at least 1 each)."""

    def __init__(self) -> None:
        self.cores = 1
        self.index = 0

    def of(self, limit: int | None) -> int | None:
        if limit is None:
            return None
        share = limit // self.cores + (1 if self.index < limit % self.cores else 0)
        return max(share, 1)


class AccountSync:
    """See the module docstring. `run()` is the subscription, `resync()` the periodic reload."""

    def __init__(
        self,
        accounts: AccountStore,
        ledger: MirrorLedger,
        supply: LeaseSupply,
        link: Link,
        *,
        dsn: str,
        ssl: ssl_module.SSLContext | None,
        resync_every_s: float,
    ) -> None:
        self._accounts = accounts
        self._ledger = ledger
        self._supply = supply
        self._link = link
        self._dsn = dsn
        self._ssl = ssl
        self._resync_every_s = resync_every_s
        self.shares = Shares()
        self._fresh = False
        self._fresh_event = asyncio.Event()
        self._lookups = asyncio.Semaphore(MAX_LOOKUPS)
        self._misses: dict[bytes, float] = {}
        # Each mirrored key's limits as PostgreSQL has them (the mirror holds shares).
        self._limits: dict[str, KeyLimits] = {}
        self.changes_applied = 0
        self.reloads = 0
        # Told of every change to a reserved endpoint (reserved_cluster.py reads it then).
        self.on_endpoints: Callable[[], None] = lambda: None

    @property
    def fresh(self) -> bool:
        return self._fresh

    async def wait_fresh(self) -> None:
        await self._fresh_event.wait()

    def check(self) -> None:
        """Raises UNAVAILABLE while the mirror may be missing changes."""
        if not self._fresh:
            raise unavailable(
                "The core is catching up with the ledger's account changes; retry shortly."
            )

    # ---- reading into the mirror -------------------------------------------------------------

    async def load_all(self) -> None:
        with db.purpose("sync"):
            workspaces = await self._link.call(self._accounts.workspaces())
            keys = await self._link.call(self._accounts.keys())
        for ws in workspaces:
            self.install_workspace(ws)
        for key in keys:
            self.install_key(key)
        self.reloads += 1

    async def refresh_workspace(self, workspace_id: str) -> None:
        with db.purpose("sync"):
            row = await self._link.call(self._accounts.workspace(workspace_id))
        self.install_workspace(row)

    async def refresh_key(self, key_id: str) -> None:
        with db.purpose("sync"):
            row = await self._link.call(self._accounts.key(key_id))
            if self._ledger.mirrored_workspace(row.workspace_id) is None:
                await self.refresh_workspace(row.workspace_id)
        self.install_key(row)

    def has_webhook(self, workspace_id: str) -> bool:
        ws = self._ledger.mirrored_workspace(workspace_id)
        return ws is not None and bool(ws.alerts.webhook_url)

    def knows_workspace(self, workspace_id: str) -> bool:
        return self._ledger.mirrored_workspace(workspace_id) is not None

    def install_workspace(self, row: WorkspaceRow) -> None:
        ws = self._ledger.install_workspace(row.id, row.name, ms(row.created_at))
        # Only read to know whether to look at the workspace after its charges commit.
        ws.auto_reload = row.auto_reload
        ws.alerts = row.alerts

    def install_key(self, row: KeyRow) -> None:
        limits = row.limits
        monthly_limited = limits.monthly_tokens is not None
        key = self._ledger.install_key(
            ApiKey(
                id=row.id,
                workspace_id=row.workspace_id,
                name=row.name,
                prefix=row.prefix,
                secret_sha256=row.secret_sha256,
                created_ms=ms(row.created_at),
                revoked=row.revoked_at is not None,
            ),
            requests_share=self.shares.of(limits.requests_per_minute),
            tokens_share=self.shares.of(limits.tokens_per_minute),
            monthly_limited=monthly_limited,
        )
        self._limits[row.id] = limits
        self._supply.key_changed(key, monthly_limited=monthly_limited)

    def set_shares(self, cores: int, index: int) -> None:
        """Takes this core's place among `cores` live ones: every key's per-minute limits
        become this core's share of them (from its next admission on)."""
        assert cores >= 1 and 0 <= index < cores, (cores, index)
        if (self.shares.cores, self.shares.index) == (cores, index):
            return
        log.info("this core is %d of %d live cores: per-minute limits are shared so",
                 index + 1, cores)  # fmt: skip
        self.shares.cores, self.shares.index = cores, index
        for key_id, limits in self._limits.items():
            key = self._ledger.mirrored_key(key_id)
            if key is not None:
                key.limits = msgspec.structs.replace(
                    key.limits,
                    requests_per_minute=self.shares.of(limits.requests_per_minute),
                    tokens_per_minute=self.shares.of(limits.tokens_per_minute),
                )

    async def lookup(self, secret_sha256: bytes) -> bool:
        """Looks up a key this core does not know; True if it now does."""
        now = time.monotonic()
        if self._misses.get(secret_sha256, 0.0) > now:
            return False
        async with self._lookups:
            with db.purpose("auth"):
                row = await self._link.call(self._accounts.key_by_secret(secret_sha256))
            if row is not None and self._ledger.mirrored_workspace(row.workspace_id) is None:
                await self.refresh_workspace(row.workspace_id)
        if row is None:
            if len(self._misses) >= MAX_MISSES:
                self._misses.clear()
            self._misses[secret_sha256] = now + MISS_TTL_S
            return False
        self.install_key(row)
        return True

    # ---- the subscription ----------------------------------------------------------------

    async def run(self) -> None:
        """Subscribes, reloads everything, then applies each change as it comes; on losing
        the subscription, refuses until subscribed and reloaded again. Returns only when
        cancelled."""
        delay = RECONNECT_INITIAL_S
        while True:
            try:
                subscription = await Subscription.open(self._dsn, ssl=self._ssl)
            except db.UNREACHABLE as exc:
                self._lose(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            try:
                # Listening already: whatever commits after this reload is delivered.
                await self.load_all()
                self._fresh = True
                self._fresh_event.set()
                delay = RECONNECT_INITIAL_S
                await self._follow(subscription)
            except SubscriptionLost as exc:
                self._lose(exc)
            except Exception as exc:  # unreachable, or a refusal made of it
                self._lose(exc)
            finally:
                await subscription.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _follow(self, subscription: Subscription) -> None:
        while True:
            try:
                change = await asyncio.wait_for(subscription.get(), PING_S)
            except TimeoutError:
                if not await subscription.alive(PING_S):
                    raise SubscriptionLost("the listening connection stopped answering") from None
                continue
            await self.apply(change)

    async def apply(self, change: AccountChange) -> None:
        # Not found: gone, or of another ledger on the same database (its schema): not ours.
        with contextlib.suppress(errors.NotFound):
            await self._apply(change)
        self.changes_applied += 1

    async def _apply(self, change: AccountChange) -> None:
        what = change.what
        if what in ("workspace_created", "alerts_set"):
            await self.refresh_workspace(change.workspace_id)
        elif what == "spend_cap_set":
            # A lower cap applies to what is not admitted yet: free lease credit goes back.
            self._supply.give_back_free(change.workspace_id)
        elif what in ("key_created", "key_revoked", "key_limits_set"):
            assert change.key_id is not None
            await self.refresh_key(change.key_id)
        elif what == "endpoint_changed":
            self.on_endpoints()
        # Top-ups and auto-reload settings need nothing here: the next grant reads them.

    def _lose(self, error: BaseException) -> None:
        if self._fresh:
            log.warning("account changes may have been missed (%s); refusing until reloaded",
                        error)  # fmt: skip
        self._fresh = False
        self._fresh_event.clear()

    async def resync(self) -> None:
        """Reloads everything every `resync_every_s` (belt and braces). Returns only when
        cancelled."""
        while True:
            await asyncio.sleep(self._resync_every_s)
            if not self._fresh:
                continue
            try:
                await self.load_all()
            except Exception as exc:
                log.warning("periodic reload of the accounts failed: %s", exc)
