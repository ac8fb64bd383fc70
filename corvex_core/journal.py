"""The journal: the durable record of every change to the ledger, in SQLite (WAL mode).

Appending is a synchronous, non-blocking call on the event loop; one writer thread commits
what has accumulated in one transaction (group commit: many records per fsync, no added wait)
and then wakes whoever waits on `sync_point()`. Snapshots of the whole ledger keep recovery
short. Recovery checks every record's CRC and that sequence numbers have no gap, and refuses
to start on anything it cannot explain rather than rebuilding a wrong ledger. This module
never interprets records; the ledger does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import queue
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Final

import msgspec

from corvex_core import records
from corvex_core.sqlite_wal import check_wal
from corvex_core.state import LedgerState

log = logging.getLogger(__name__)

DB_NAME: Final = "journal.sqlite3"
# Records appended but not yet durable, beyond which new account changes and admissions are
# refused (the disk is not keeping up). Charges of requests already admitted are always taken:
# there are at most as many of them as requests in flight.
MAX_BACKLOG: Final = 65_536
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, body BLOB NOT NULL,
                                    crc INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (seq INTEGER PRIMARY KEY, body BLOB NOT NULL,
                                      crc INTEGER NOT NULL);
"""
_snapshot_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(LedgerState)


class JournalError(Exception):
    """The journal cannot be written or read. The message says what an operator should do."""


class JournalCorrupt(JournalError):
    """Recovery found data it cannot trust; the core refuses to start."""


class JournalBusy(JournalError):
    """The disk is a backlog of records behind; nothing new is taken until it catches up."""


def _crc(seq: int, body: bytes) -> int:
    # The sequence number is part of the checksum so that a record moved to another row is
    # detected as well as a flipped bit.
    return zlib.crc32(body, zlib.crc32(struct.pack("<q", seq)))


class Recovery(msgspec.Struct):
    """What recovery found: the snapshot state (or None) and the records after it."""

    state: LedgerState | None
    records: list[records.Record]
    last_seq: int
    snapshot_seq: int


class Journal:
    """A SQLite journal with a writer thread. Create, `recover()`, `start()`, then `append`."""

    def __init__(
        self,
        directory: Path,
        *,
        max_batch: int = 1024,
        fsync: bool = True,
        max_backlog: int = MAX_BACKLOG,
    ) -> None:
        assert max_batch >= 1 and max_backlog >= 1
        self._max_backlog = max_backlog
        self._path = directory / DB_NAME
        self._max_batch = max_batch
        self._fsync = fsync
        self._queue: queue.SimpleQueue[tuple[int, bytes] | _Snapshot | None] = queue.SimpleQueue()
        self._seq = 0  # last sequence number appended
        self._durable_seq = 0  # last sequence number known to be on disk
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._failure: JournalError | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._since_snapshot = 0
        self.on_batch: Callable[[int, float], None] | None = None  # (records, seconds)
        # Called on the event loop, once, when a write fails.
        self.on_failure: Callable[[JournalError], None] | None = None

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def failure(self) -> JournalError | None:
        """Set once a write failed; from then on every append fails and the core stops taking
        work, because memory and disk can no longer be trusted to agree."""
        return self._failure

    @property
    def records_since_snapshot(self) -> int:
        return self._since_snapshot

    @property
    def backlog(self) -> int:
        """Records appended but not yet on disk."""
        return self._seq - self._durable_seq

    def check_writable(self) -> None:
        """Raises JournalError if a new change could not be taken now: after a failed write,
        or while the disk is MAX_BACKLOG records behind."""
        if self._failure is not None:
            raise JournalError(str(self._failure)) from None
        if self.backlog >= self._max_backlog:
            raise JournalBusy(f"the journal is {self.backlog} records behind the disk")

    # ---- recovery (before start) ---------------------------------------------------------

    def recover(self) -> Recovery:
        """Reads the latest valid snapshot and every record after it. Blocking."""
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # SQLite gives the -wal and -shm files the database file's mode, so creating it 0600
        # keeps all three private whatever the umask.
        os.close(os.open(self._path, os.O_WRONLY | os.O_CREAT, 0o600))
        recovery = self.read_durable()
        self._seq = self._durable_seq = recovery.last_seq
        self._since_snapshot = len(recovery.records)
        return recovery

    def read_durable(self) -> Recovery:
        """What is on disk now, read without changing anything: the start-up recovery, and
        the state a core falls back to when a write fails. Blocking."""
        wal = check_wal(Path(f"{self._path}-wal"))
        if wal.damaged_frame is not None:
            raise JournalCorrupt(
                f"The journal's write-ahead log {self._path}-wal is damaged at frame "
                f"{wal.damaged_frame} of {wal.frames}, with acknowledged records after it. "
                "SQLite would silently drop them, so the core will not start: restore the "
                "data directory from a backup."
            )
        try:
            with contextlib.closing(_connect(self._path, fsync=self._fsync)) as db:
                state, snapshot_seq = _load_snapshot(db)
                found = list(_read_records(db, after=snapshot_seq))
                last_seq = db.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise JournalCorrupt(
                f"The journal {self._path} cannot be read ({exc}). The core will not start on "
                "a damaged journal: restore the data directory from a backup."
            ) from exc
        last_seq = max(last_seq, snapshot_seq)
        return Recovery(state=state, records=found, last_seq=last_seq, snapshot_seq=snapshot_seq)

    # ---- writing -------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._writer, name="journal-writer", daemon=True)
        self._thread.start()

    def append(self, record: records.Record) -> None:
        """Queues a record for the next commit. Pair with `sync_point()` before acknowledging.

        Raises JournalError, having queued nothing, if the journal cannot take it (see
        `check_writable`; a charge is refused only after a failed write).
        """
        if self._failure is not None or not isinstance(record, records.Charged):
            self.check_writable()
        self._seq += 1
        self._since_snapshot += 1
        self._queue.put((self._seq, records.encode(record)))

    def sync_point(self) -> Awaitable[None]:
        """Resolves once every record appended so far is durable (raises JournalError if not)."""
        if self._failure is not None:
            raise JournalError(str(self._failure)) from None
        assert self._loop is not None, "journal not started"
        future: asyncio.Future[None] = self._loop.create_future()
        if self._seq <= self._durable_seq:
            future.set_result(None)
        else:
            self._waiters.append((self._seq, future))
        return future

    def snapshot(self, state: LedgerState, *, seq: int | None = None) -> None:
        """Queues a snapshot of the ledger as of the last appended record (or of record
        `seq`, for a state that is valid then: a cluster core's empty one, once the charges up
        to `seq` are in PostgreSQL)."""
        assert seq is None or 0 <= seq <= self._seq, (seq, self._seq)
        body = _snapshot_encoder.encode(state)
        self._since_snapshot = 0
        self._queue.put(_Snapshot(self._seq if seq is None else seq, body))

    async def close(self) -> None:
        """Writes everything queued, then stops the writer. Safe to call twice."""
        if self._thread is None:
            return
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def _writer(self) -> None:
        try:
            with contextlib.closing(_connect(self._path, fsync=self._fsync)) as db:
                while self._write_batch(db):
                    pass
        except Exception as exc:
            # Logged once, here; from now on every refusal is a fresh, short JournalError.
            log.critical("journal write failed: %s", exc, exc_info=True)
            self._fail(JournalError(f"journal write failed: {exc}"))

    def _write_batch(self, db: sqlite3.Connection) -> bool:
        """Writes one batch. Returns False after the stop marker."""
        first = self._queue.get()
        items = [first]
        while len(items) < self._max_batch and first is not None:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        stop = any(item is None for item in items)
        rows = [item for item in items if isinstance(item, tuple)]
        snapshots = [item for item in items if isinstance(item, _Snapshot)]
        if rows or snapshots:
            started = time.perf_counter()
            with db:  # one transaction: one fsync for the whole batch
                db.executemany(
                    "INSERT INTO records (seq, body, crc) VALUES (?, ?, ?)",
                    [(seq, body, _crc(seq, body)) for seq, body in rows],
                )
                for snap in snapshots:
                    db.execute(
                        "INSERT OR REPLACE INTO snapshots (seq, body, crc) VALUES (?, ?, ?)",
                        (snap.seq, snap.body, _crc(snap.seq, snap.body)),
                    )
                    db.execute("DELETE FROM snapshots WHERE seq < ?", (snap.seq,))
            elapsed = time.perf_counter() - started
            if rows:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._on_durable, rows[-1][0], len(rows), elapsed)
        return not stop

    def _on_durable(self, seq: int, count: int, elapsed_s: float) -> None:
        self._durable_seq = max(self._durable_seq, seq)
        while self._waiters and self._waiters[0][0] <= seq:
            _, future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
        if self.on_batch is not None:
            self.on_batch(count, elapsed_s)

    def _fail(self, error: JournalError) -> None:
        self._failure = error  # stops new appends at once, from any thread

        def fail_waiters() -> None:
            while self._waiters:
                _, future = self._waiters.popleft()
                if not future.done():
                    future.set_exception(JournalError(str(error)))
            if self.on_failure is not None:
                self.on_failure(error)

        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fail_waiters)


class _Snapshot(msgspec.Struct, frozen=True):
    seq: int
    body: bytes


def _connect(path: Path, *, fsync: bool) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    # FULL: every commit is fsynced before it returns, which is what "durable" means here.
    db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'OFF'}")
    db.executescript(_SCHEMA)
    return db


def _load_snapshot(db: sqlite3.Connection) -> tuple[LedgerState | None, int]:
    row = db.execute("SELECT seq, body, crc FROM snapshots ORDER BY seq DESC LIMIT 1").fetchone()
    if row is None:
        return None, 0
    seq, body, crc = row
    if _crc(seq, body) != crc:
        raise JournalCorrupt(
            f"The journal's snapshot at record {seq} fails its checksum. Restore the data "
            "directory from a backup."
        )
    return _snapshot_decoder.decode(body), seq


def _read_records(db: sqlite3.Connection, *, after: int) -> Iterator[records.Record]:
    expected = after + 1
    for seq, body, crc in db.execute(
        "SELECT seq, body, crc FROM records WHERE seq > ? ORDER BY seq", (after,)
    ):
        if seq != expected:
            raise JournalCorrupt(
                f"The journal is missing record {expected} (next is {seq}). Restore the data "
                "directory from a backup."
            )
        if _crc(seq, body) != crc:
            raise JournalCorrupt(
                f"Journal record {seq} fails its checksum: the file was damaged after it was "
                "written. The core will not rebuild balances from it; restore the data "
                "directory from a backup."
            )
        try:
            yield records.decode(body)
        except msgspec.DecodeError as exc:
            raise JournalCorrupt(f"Journal record {seq} cannot be decoded: {exc}") from exc
        expected += 1
