"""The journal: group commit, recovery, snapshots, and damaged files."""

from __future__ import annotations

import asyncio
import random
import shutil
from pathlib import Path

import pytest

from corvex_core import records
from corvex_core.journal import DB_NAME, Journal, JournalBusy, JournalCorrupt
from corvex_core.ledger import Ledger
from corvex_core.records import KeyLimits
from corvex_core.server import Core
from tests.conftest import core_config


def topup(n: int) -> records.CreditsAdded:
    return records.CreditsAdded(
        at_ms=1_700_000_000_000 + n,
        workspace_id="ws_1",
        invoice_number=n + 1,
        amount_nano=10_000_000 * (n + 1),
        method="manual",
        idempotency_key=f"k{n}",
    )


async def write_batches(
    journal: Journal, batches: int, per_batch: int, start: int = 0
) -> list[records.Record]:
    """Appends `batches` separate transactions (waiting for each), returns what was written."""
    written: list[records.Record] = []
    for b in range(batches):
        for i in range(per_batch):
            record = topup(start + b * per_batch + i)
            journal.append(record)
            written.append(record)
        await journal.sync_point()
    return written


def recovered(directory: Path) -> list[records.Record]:
    return Journal(directory).recover().records


async def test_group_commit_and_recovery(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    assert journal.recover().records == []
    journal.start()
    batch_sizes: list[int] = []
    journal.on_batch = lambda count, _elapsed: batch_sizes.append(count)
    written = [topup(i) for i in range(500)]
    for record in written:
        journal.append(record)
    await journal.sync_point()
    await journal.close()
    # Many records per transaction: far fewer commits than records.
    assert sum(batch_sizes) == 500 and len(batch_sizes) < 100
    assert recovered(tmp_path) == written


async def test_sync_point_waits_for_disk(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.recover()
    journal.start()
    journal.append(topup(0))
    point = journal.sync_point()
    assert isinstance(point, asyncio.Future) and not point.done()
    await point
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (DB_NAME, DB_NAME + "-wal"):
        if (tmp_path / name).exists():
            shutil.copy(tmp_path / name, copy / name)
    # A crash image taken right after the sync point holds the record.
    assert recovered(copy) == [topup(0)]
    await journal.close()


async def test_snapshot_then_tail(tmp_path: Path) -> None:
    ledger = Ledger(clock=lambda: 1_800_000_000.0)
    journal = Journal(tmp_path)
    journal.recover()
    journal.start()
    ledger.set_sink(journal.append)
    ws, _ = ledger.create_workspace("a", 500_000_000)
    key, _secret = ledger.create_key(ws.id, "k", KeyLimits())
    journal.snapshot(ledger.state)
    ledger.add_credits(ws.id, 100_000_000, "manual", "after-snapshot")
    await journal.sync_point()
    await journal.close()

    recovery = Journal(tmp_path).recover()
    assert recovery.state is not None
    assert len(recovery.records) == 1
    rebuilt = Ledger(state=recovery.state)
    for record in recovery.records:
        rebuilt.apply(record)
    assert rebuilt.workspace(ws.id).balance_nano == 600_000_000
    assert rebuilt.key(key.id).name == "k"


def crash_image(directory: Path, target: Path) -> Path:
    """A copy of the journal files as a power cut would leave them (WAL not checkpointed)."""
    target.mkdir()
    for name in (DB_NAME, DB_NAME + "-wal"):
        shutil.copy(directory / name, target / name)
    return target


@pytest.mark.parametrize("seed", range(6))
async def test_torn_wal_tail_recovers_a_prefix(tmp_path: Path, seed: int) -> None:
    journal = Journal(tmp_path / "live")
    journal.recover()
    journal.start()
    written = await write_batches(journal, batches=12, per_batch=7)
    image = crash_image(tmp_path / "live", tmp_path / "image")
    await journal.close()
    wal = image / (DB_NAME + "-wal")
    size = wal.stat().st_size
    cut = random.Random(seed).randrange(32, size)
    with wal.open("r+b") as file:
        file.truncate(cut)
    found = recovered(image)
    # Never a wrong ledger: exactly the records of the transactions that were whole.
    assert found == written[: len(found)]
    assert len(found) % 7 == 0


async def test_flipped_bit_in_an_old_wal_frame_refuses_to_start(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "live")
    journal.recover()
    journal.start()
    await write_batches(journal, batches=10, per_batch=5)
    image = crash_image(tmp_path / "live", tmp_path / "image")
    await journal.close()
    wal = image / (DB_NAME + "-wal")
    data = bytearray(wal.read_bytes())
    offset = data.index(records.encode(topup(12)))  # a record of an early transaction
    data[offset + 5] ^= 0x10
    wal.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt, match="damaged at frame"):
        Journal(image).recover()


async def test_flipped_bit_in_the_database_refuses_to_start(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.recover()
    journal.start()
    await write_batches(journal, batches=3, per_batch=10)
    await journal.close()  # the last connection checkpoints: records are in the main file
    db = tmp_path / DB_NAME
    assert (
        not (tmp_path / (DB_NAME + "-wal")).exists()
        or (tmp_path / (DB_NAME + "-wal")).stat().st_size == 0
    )
    data = bytearray(db.read_bytes())
    offset = data.index(records.encode(topup(29)))  # the very last record
    data[offset + 8] ^= 0x01
    db.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt, match="checksum"):
        Journal(tmp_path).recover()


async def test_truncated_database_refuses_to_start(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.recover()
    journal.start()
    await write_batches(journal, batches=40, per_batch=50)
    await journal.close()
    db = tmp_path / DB_NAME
    with db.open("r+b") as file:
        file.truncate(db.stat().st_size // 2)
    with pytest.raises(JournalCorrupt):
        Journal(tmp_path).recover()


def charge(n: int) -> records.Charged:
    return records.Charged(
        at_ms=1_700_000_000_000 + n, charge_id=f"ch_{n}", request_id="r", workspace_id="ws_1",
        key_id="key_1", model="m/m", prompt_tokens=1, completion_tokens=1,
        cached_prompt_tokens=0, cost_nano=1, rate_card_version="v",
    )  # fmt: skip


async def test_a_backlog_at_its_bound_refuses_changes_but_takes_charges(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_backlog=2)
    journal.recover()  # not started: nothing reaches the disk, so the backlog only grows
    journal.append(topup(0))
    journal.append(topup(1))
    with pytest.raises(JournalBusy):
        journal.append(topup(2))
    assert journal.backlog == 2
    # A request that already ran is always recorded: charges are bounded by admissions,
    # which the bound refuses first.
    journal.append(charge(0))
    assert journal.backlog == 3


async def test_a_record_that_does_not_fit_the_ones_before_stops_the_start(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "data")
    journal.recover()
    journal.start()
    journal.append(charge(0))  # a charge of a workspace no record created
    await journal.sync_point()
    await journal.close()
    core = Core(core_config(tmp_path / "data"))
    with pytest.raises(JournalCorrupt, match="Journal record 1 does not fit"):
        await core.start()
    await core.server.stop(grace=0)
    await core.close()
