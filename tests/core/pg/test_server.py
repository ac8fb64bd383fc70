"""The local PostgreSQL server: loopback only, password required, not root, data kept or not."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from corvex_core.pg import server
from corvex_core.pg.server import PgServer, PgServerError


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A scratch directory the server's user may pass through (pytest's tmp_path is 0700)."""
    scratch = Path(tempfile.mkdtemp(prefix="corvex-pg-test-"))
    scratch.chmod(0o755)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch)


async def test_the_session_server_listens_on_loopback_only(pg_server: PgServer) -> None:
    conn = await asyncpg.connect(pg_server.dsn())
    try:
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
        assert await conn.fetchval("SHOW unix_socket_directories") == ""
        assert (await conn.fetchval("SHOW server_version")).startswith("18.")
    finally:
        await conn.close()


async def test_a_wrong_password_is_refused(pg_server: PgServer) -> None:
    wrong = pg_server.dsn().replace(pg_server.password, "not-the-password")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(wrong)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root has to hand the server to another user")
def test_as_root_the_server_runs_as_its_own_user(pg_server: PgServer) -> None:
    owner = pg_server.data_dir.stat().st_uid
    assert pwd.getpwuid(owner).pw_name == server.SERVICE_USER
    pid = int((pg_server.data_dir / "postmaster.pid").read_text().split()[0])
    assert os.stat(f"/proc/{pid}").st_uid == owner


@pytest.mark.skipif(os.geteuid() != 0, reason="only root has to hand the server to another user")
def test_a_data_directory_the_server_user_cannot_reach_is_refused(tmp_path: Path) -> None:
    assert not tmp_path.parent.stat().st_mode & stat.S_IXOTH  # pytest makes these 0700
    with pytest.raises(PgServerError, match="cannot pass"):
        server.start(tmp_path / "pg")


async def test_a_kept_server_keeps_its_data_and_port_across_restarts(open_dir: Path) -> None:
    data_dir = open_dir / "pg"
    first = server.start(data_dir)
    try:
        conn = await asyncpg.connect(first.dsn())
        await conn.execute("CREATE TABLE kept (n INT); INSERT INTO kept VALUES (42)")
        await conn.close()
    finally:
        server.stop(first)
    second = server.start(data_dir, port=first.port)
    try:
        assert second.port == first.port and second.password == first.password
        conn = await asyncpg.connect(second.dsn())
        assert await conn.fetchval("SELECT n FROM kept") == 42
        assert await conn.fetchval("SHOW fsync") == "on"
        await conn.close()
    finally:
        server.stop(second)
    assert (data_dir / "PG_VERSION").exists()


def test_a_throwaway_server_leaves_nothing_behind() -> None:
    with server.running() as pg:
        data_dir = pg.data_dir
        assert (data_dir / "PG_VERSION").exists()
    assert not data_dir.exists()
