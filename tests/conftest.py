"""Shared fixtures: an in-process core on port 0 (for tests that look inside it) and the real
stack as processes (for tests that use it as a client would)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import msgspec
import pytest

from corvex.v1 import accounts_pb2
from corvex_core.config import CoreConfig, SimulatedEngineConfig
from corvex_core.pg import server as pg
from corvex_core.pg.server import PgServer
from corvex_core.server import Core
from corvex_ops.admin import Client
from corvex_ops.stack import Stack, running_stack

ADMIN_TOKEN = "test-admin-token"
# The database of the session's PostgreSQL that tests/core/pg makes its schemas in.
DATABASE = "corvex_test"
FAST_ENGINE: dict[str, Any] = {
    "backend": "simulated",
    "ttft_ms": 0,
    "tpot_ms": 0,
    "prefill_ms_per_1k_tokens": 0,
}
# The process stack's configuration: instant engines, no starter credits, no metrics port.
STACK_CONFIG: dict[str, Any] = {
    "core": {
        "metrics_port": -1,
        "accounts": {"starter_credits_usd": "0"},
        "engines": {"default": FAST_ENGINE},
    },
}
MODEL = "deepseek-ai/DeepSeek-V4-Flash"


def core_config(data_dir: Path, **engine: Any) -> CoreConfig:
    config = msgspec.convert(
        {
            "port": 0,
            "metrics_port": -1,
            "data_dir": str(data_dir),
            "admin_token": ADMIN_TOKEN,
            "drain_grace_s": 5,
            "accounts": {"starter_credits_usd": "0"},
            "engines": {"default": {**FAST_ENGINE, **engine}},
        },
        CoreConfig,
    )
    assert isinstance(config.engines.default, SimulatedEngineConfig)
    return config


@contextlib.asynccontextmanager
async def started_core(config: CoreConfig) -> AsyncIterator[Core]:
    """A core with this configuration, started in this test's event loop and stopped after."""
    instance = Core(config)
    await instance.start()
    try:
        yield instance
    finally:
        await instance.server.stop(grace=0)
        await instance.close()


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Core]:
    """A core in this test's event loop, with instant simulated engines."""
    async with started_core(core_config(tmp_path / "data")) as instance:
        yield instance


@pytest.fixture
async def channel(core: Core) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as chan:
        yield chan


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """The real core and edge as processes, shared by the tests that only act as clients."""
    with running_stack(config=STACK_CONFIG) as running:
        yield running


@pytest.fixture(scope="session")
def admin(stack: Stack) -> Iterator[Client]:
    client = Client(stack.grpc_address, ADMIN_TOKEN)
    yield client
    client.close()


class Account(msgspec.Struct):
    workspace_id: str
    key_id: str
    secret: str


def new_account(
    admin: Client,
    *,
    credits_cents: int = 1000,
    limits: accounts_pb2.KeyLimits | None = None,
    name: str = "test",
) -> Account:
    """A fresh workspace holding `credits_cents`, and one key."""
    ws = admin.CreateWorkspace(
        accounts_pb2.CreateWorkspaceRequest(name=name, starter_credits_cents=credits_cents)
    )
    created = admin.CreateKey(
        accounts_pb2.CreateKeyRequest(workspace_id=ws.id, name=name, limits=limits)
    )
    return Account(ws.id, created.key.id, created.secret)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One throwaway PostgreSQL for the whole session, stopped (and deleted) at its end: the
    ledger tests make a schema per test in it, the cluster tests a database per module."""
    with pg.running() as running:
        asyncio.run(execute_sql(running.dsn(), f"CREATE DATABASE {DATABASE}"))
        yield running


async def execute_sql(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
