"""Whether this core can reach PostgreSQL now, and the one sentence it refuses with if not.

Any store call that fails as unreachable (`pg.db.UNREACHABLE`) marks the link down; a probe
(`SELECT 1`) every PROBE_S brings it back up. While it is down a core refuses what needs the
ledger with UNAVAILABLE and a retry hint, so a client never waits on a database that is gone.
It owns no money and decides nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterator
from typing import Final, TypeVar

from corvex_core import errors
from corvex_core.pg import db

log = logging.getLogger(__name__)

PROBE_S: Final = 0.5
RETRY_AFTER_S: Final = 1.0
UNREACHABLE_MESSAGE: Final = (
    "The ledger database (PostgreSQL) cannot be reached; nothing was charged or changed. "
    "Retry shortly."
)
T = TypeVar("T")


def unavailable(message: str = UNREACHABLE_MESSAGE) -> errors.ServiceUnavailable:
    """A refusal before anything was done (`admitted: false`: an edge may try another core)."""
    return errors.ServiceUnavailable(
        message, retry_after_s=RETRY_AFTER_S, metadata={"admitted": "false"}
    )


class Link:
    """See the module docstring. `run()` is the probe; `call()` wraps every store call."""

    def __init__(self, pool: db.Pool) -> None:
        self._pool = pool
        self._up = True
        self._changed = asyncio.Event()
        self.downs = 0

    @property
    def up(self) -> bool:
        return self._up

    def down(self, error: BaseException) -> None:
        if self._up:
            self._up = False
            self.downs += 1
            log.warning("the ledger database is unreachable (%s); refusing until it is back", error)
            self._changed.set()

    def check(self) -> None:
        """Raises UNAVAILABLE while the database cannot be reached."""
        if not self._up:
            raise unavailable()

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Turns an unreachable database into a clean refusal, and notes it."""
        try:
            yield
        except db.UNREACHABLE as exc:
            self.down(exc)
            raise unavailable() from exc

    async def call(self, operation: Awaitable[T]) -> T:
        with self.watching():
            return await operation

    async def run(self) -> None:
        """Probes while the link is down; returns only when cancelled."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            while not self._up:
                await asyncio.sleep(PROBE_S)
                try:
                    with db.purpose("probe"):
                        async with self._pool.acquire() as conn:
                            await conn.fetchval("SELECT 1", timeout=PROBE_S * 4)
                except Exception:  # anything but an answer: still down
                    continue
                self._up = True
                log.info("the ledger database is reachable again")
