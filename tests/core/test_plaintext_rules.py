"""Plaintext is the default only on loopback: a core asked to listen elsewhere, a core pointed
at a remote PostgreSQL, or an edge pointed at remote cores, each without TLS, refuses to start
and says what to configure."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from corvex_core.config import LedgerConfig
from corvex_core.server import Core, StartupError
from gateway import upstream
from gateway.config import EdgeConfig
from tests.conftest import core_config


async def test_a_core_listening_beyond_loopback_needs_tls(tmp_path: Path) -> None:
    core = Core(msgspec.structs.replace(core_config(tmp_path / "data"), host="0.0.0.0"))
    try:
        with pytest.raises(StartupError, match=r"core\.tls"):
            await core.start()
    finally:
        await core.server.stop(grace=0)
        await core.close()


async def test_a_core_using_a_remote_postgres_needs_tls(tmp_path: Path) -> None:
    ledger = LedgerConfig(backend="postgres", dsn="postgresql://corvex:secret@10.1.2.3/corvex")
    config = msgspec.structs.replace(core_config(tmp_path / "data"), ledger=ledger)
    with pytest.raises(StartupError, match=r"core\.ledger\.tls\.ca_file") as refused:
        Core(config)
    assert "secret" not in str(refused.value)


def test_an_edge_using_remote_cores_needs_tls() -> None:
    with pytest.raises(ValueError, match=r"edge\.core_tls"):
        upstream.check_plaintext(EdgeConfig(cores=["127.0.0.1:50051", "10.1.2.3:50051"]))
    upstream.check_plaintext(EdgeConfig(cores=["127.0.0.1:50051", "localhost:50052"]))
    upstream.check_plaintext(EdgeConfig(cores=["10.1.2.3:50051"], allow_plaintext=True))
