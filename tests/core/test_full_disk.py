"""A core whose data directory fills up: it turns read-only at the first failed write, never
shows what did not reach the disk, logs the failure once, and starts cleanly once space is
free. The data directory is a real 4 MiB tmpfs (the tests run as root)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from corvex.v1 import accounts_pb2, accounts_pb2_grpc, inference_pb2_grpc
from corvex_core.lifecycle import State
from corvex_core.server import Core
from tests.conftest import core_config
from tests.core.servicers.test_inference_grpc import ADMIN, auth, chat, error_info


@contextlib.contextmanager
def small_disk(path: Path, size: str = "4m") -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(disk: Path) -> Path:
    """Takes every free byte of the disk; returns the file to delete to give them back."""
    filler = disk / "filler"
    with filler.open("wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 65536)
            out.flush()
    return filler


async def test_a_full_disk_turns_the_core_read_only_with_nothing_ahead_of_the_disk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with small_disk(tmp_path / "disk") as disk:
        data = disk / "data"
        core = Core(core_config(data, tpot_ms=20))
        await core.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
                admin = accounts_pb2_grpc.AccountsStub(channel)
                ws = await admin.CreateWorkspace(
                    accounts_pb2.CreateWorkspaceRequest(name="w", starter_credits_cents=1000),
                    metadata=ADMIN,
                )
                key = await admin.CreateKey(
                    accounts_pb2.CreateKeyRequest(workspace_id=ws.id, name="k"), metadata=ADMIN
                )
                inference = inference_pb2_grpc.InferenceStub(channel)
                running = inference.Chat(
                    chat(max_tokens=500, ignore_eos=True), metadata=auth(key.secret)
                )
                assert (await running.read()).completion_tokens >= 0  # admitted and streaming
                filler = fill(disk)
                with caplog.at_level(logging.INFO):
                    refusals = []
                    for n in range(40):
                        top_up = accounts_pb2.AddCreditsRequest(
                            workspace_id=ws.id, amount_cents=100 + n, idempotency_key=f"k{n}"
                        )
                        # Each top-up adds a row; the first that does not fit fails the write.
                        with contextlib.suppress(grpc.aio.AioRpcError):
                            await admin.AddCredits(top_up, metadata=ADMIN)
                            continue
                        with pytest.raises(grpc.aio.AioRpcError) as refused:
                            await admin.AddCredits(top_up, metadata=ADMIN)
                        refusals.append(refused.value)
                        if len(refusals) == 3:
                            break
                    assert refusals, "the disk never filled"
                    for refusal in refusals:
                        assert refusal.code() == grpc.StatusCode.UNAVAILABLE
                        assert error_info(refusal).reason == "SERVICE_UNAVAILABLE"
                    # The stream in flight is cut short and not billed: its charge cannot be
                    # recorded any more.
                    with pytest.raises(grpc.aio.AioRpcError) as cut:
                        while await running.read() is not grpc.aio.EOF:
                            pass
                    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert "billed" in (cut.value.details() or "")
                    while core.lifecycle.state is not State.READ_ONLY:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                    assert core.ledger.held_total_nano() == 0
                    with pytest.raises(grpc.aio.AioRpcError) as generating:
                        refused_chat = inference.Chat(chat(max_tokens=5), metadata=auth(key.secret))
                        async for _ in refused_chat:
                            pass
                    assert generating.value.code() == grpc.StatusCode.UNAVAILABLE
                    health = health_pb2_grpc.HealthStub(channel)
                    checked = await health.Check(health_pb2.HealthCheckRequest())
                    assert checked.status == health_pb2.HealthCheckResponse.NOT_SERVING
                    assert core.health_details()["serving"] is False
                    # Reads still work, and show only what is durable.
                    shown = await admin.ListInvoices(
                        accounts_pb2.ListInvoicesRequest(workspace_id=ws.id), metadata=ADMIN
                    )
                    balance = (
                        await admin.GetWorkspace(
                            accounts_pb2.GetWorkspaceRequest(workspace_id=ws.id), metadata=ADMIN
                        )
                    ).balance_nano_usd
        finally:
            await core.server.stop(grace=0)
            await core.close()
        critical = [r for r in caplog.records if r.levelno >= logging.CRITICAL]
        assert len(critical) == 2  # the failed write, and the switch to read-only
        assert max(len(r.getMessage()) for r in caplog.records) < 2000
        assert len([r for r in caplog.records if r.exc_info]) == 1  # one traceback, once
        assert balance == sum(i.amount_nano_usd for i in shown.invoices)

        filler.unlink()
        restarted = Core(core_config(data))
        await restarted.start()
        try:
            # Exactly what the read-only core showed: nothing was lost, nothing invented.
            assert [i.label for i in restarted.ledger.invoices(ws.id)] == [
                i.number for i in shown.invoices
            ]
            assert restarted.ledger.workspace(ws.id).balance_nano == balance
            restarted.ledger.add_credits(ws.id, 10**9, "manual", "after")
            await restarted.durable()
        finally:
            await restarted.server.stop(grace=0)
            await restarted.close()


async def test_the_data_directory_and_its_files_are_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    (data / "dev_key.json").write_text("{}")
    (data / "dev_key.json").chmod(0o644)
    core = Core(core_config(data))
    await core.start()
    try:
        core.ledger.create_workspace("w", 0)
        await core.durable()
        assert data.stat().st_mode & 0o777 == 0o700
        for name in ("journal.sqlite3", "journal.sqlite3-wal", "journal.sqlite3-shm",
                     "dev_key.json"):  # fmt: skip
            assert (data / name).stat().st_mode & 0o777 == 0o600, name
    finally:
        await core.server.stop(grace=0)
        await core.close()
