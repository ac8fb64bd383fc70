"""Account-change notices: how every core learns of a top-up, cap or key change at once.

Each change to an account sends one notice on the channel `corvex_accounts` inside the
transaction that makes the change, so PostgreSQL delivers it when, and only if, the change
commits. A notice names what changed, never the new values: a core reads those itself, so
a notice that arrives late or twice does no harm. Notices are not stored: one sent while a
core's listening connection is down is lost, so a `Subscription` that loses its connection
or falls behind says so, and the core must then reload every account it caches.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from typing import Any, Final, Literal

import asyncpg
import msgspec

from corvex_core.pg.db import UNREACHABLE, Connection

CHANNEL: Final = "corvex_accounts"
# Notices waiting for the core to read them; past this the subscription counts as lost.
MAX_PENDING: Final = 10_000
CONNECT_TIMEOUT_S: Final = 10.0

What = Literal[
    "workspace_created",
    "credits_added",
    "spend_cap_set",
    "auto_reload_set",
    "auto_reload_failed",
    "key_created",
    "key_revoked",
    "key_limits_set",
    "alerts_set",
    "endpoint_changed",
]


class AccountChange(msgspec.Struct, frozen=True, omit_defaults=True):
    what: What
    workspace_id: str
    key_id: str | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AccountChange)


async def send(conn: Connection, change: AccountChange) -> None:
    """Queues the notice in the caller's transaction; it goes out when that commits."""
    assert conn.is_in_transaction(), "a notice outside the change's transaction"
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, _encoder.encode(change).decode())


class SubscriptionLost(Exception):
    """Notices may have been missed: reload every cached account, then subscribe again."""


class Subscription:
    """The account changes other transactions commit, in commit order, on its own connection."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._pending: asyncio.Queue[AccountChange | None] = asyncio.Queue()
        self._lost = False

    @classmethod
    async def open(cls, dsn: str, *, ssl: ssl_module.SSLContext | None = None) -> Subscription:
        """Listening when this returns: every change committed afterwards is delivered."""
        conn = await asyncpg.connect(dsn, ssl=ssl, timeout=CONNECT_TIMEOUT_S)
        subscription = cls(conn)
        await conn.add_listener(CHANNEL, subscription._on_notice)
        conn.add_termination_listener(subscription._on_terminated)
        return subscription

    async def get(self) -> AccountChange:
        """The next change; raises SubscriptionLost once notices may have been missed."""
        if self._lost:
            raise SubscriptionLost("the subscription's connection ended or fell behind")
        change = await self._pending.get()
        if change is None:
            raise SubscriptionLost("the subscription's connection ended or fell behind")
        return change

    async def alive(self, timeout_s: float) -> bool:
        """Whether the listening connection still answers (a connection cut without a word,
        by a partition, would otherwise look alive and deliver nothing). A failed check loses
        the subscription."""
        if self._lost:
            return False
        try:
            await self._conn.execute("SELECT 1", timeout=timeout_s)
        except UNREACHABLE:
            self._lose()
            return False
        return True

    async def close(self) -> None:
        try:
            await self._conn.close(timeout=CONNECT_TIMEOUT_S)
        except UNREACHABLE:
            self._conn.terminate()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _on_notice(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        del conn, pid, channel
        if self._pending.qsize() >= MAX_PENDING:
            self._lose()
            return
        assert isinstance(payload, str)
        self._pending.put_nowait(_decoder.decode(payload))

    def _on_terminated(self, conn: Any) -> None:
        del conn
        self._lose()

    def _lose(self) -> None:
        if not self._lost:
            self._lost = True
            self._pending.put_nowait(None)
