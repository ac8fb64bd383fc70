"""What the cluster tests share: a database of their own on the session's PostgreSQL, the
cluster's configuration (short leases, fast heartbeats, instant engines), and one request sent
the way each kind of client sends it (the OpenAI SDK through the edge, gRPC straight to a
core), reduced to (outcome, cost in nano-USD, tokens)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import asyncpg
import grpc
import openai

from corvex.money import NANO_PER_USD
from corvex.v1 import accounts_pb2, inference_pb2, inference_pb2_grpc
from corvex_core.pg.server import PgServer
from corvex_ops.admin import Client
from gateway.errors import from_rpc
from tests.conftest import FAST_ENGINE, MODEL, execute_sql

_databases = itertools.count(1)
PROMPT = "Race me"
LEASE_TTL_S = 10.0


def cluster_config(**ledger: Any) -> dict[str, Any]:
    return {
        "core": {
            "metrics_port": -1,
            "accounts": {"starter_credits_usd": "0"},
            "engines": {"default": FAST_ENGINE},
            "drain_grace_s": 10,
            "ledger": {
                "lease_ttl_s": LEASE_TTL_S,
                "renew_every_s": 1.0,
                "sweep_every_s": 1.0,
                "heartbeat_every_s": 0.5,
                **ledger,
            },
        },
        "edge": {"models_refresh_s": 1.0},
    }


@contextlib.contextmanager
def cluster_database(pg: PgServer) -> Iterator[str]:
    """A database of its own on the session's server (notices are per database, so clusters
    of different modules never hear each other), dropped afterwards."""
    name = f"cluster_{os.getpid()}_{next(_databases)}"
    asyncio.run(execute_sql(pg.dsn(), f"CREATE DATABASE {name}"))
    try:
        yield pg.dsn(name)
    finally:
        asyncio.run(execute_sql(pg.dsn(), f"DROP DATABASE {name} WITH (FORCE)"))


async def fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


Outcome = tuple[str, int, int]


async def via_edge(
    client: openai.AsyncOpenAI, max_tokens: int | None, *, request_id: str = ""
) -> Outcome:
    """One streamed chat through the edge: ('ok', cost, tokens) or (error code, 0, 0)."""
    extra = {"x-request-id": request_id} if request_id else None
    try:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
            extra_headers=extra,
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
    except openai.APIStatusError as exc:
        return str(exc.code), 0, 0
    assert usage is not None
    extra = usage.model_extra or {}
    # `cost` reaches us as the SDK's float: its shortest repr is the JSON's digits, which are
    # the charge's exact decimal (Decimal(float) would be the binary value, 1 nano short).
    assert Decimal(repr(extra["cost"])) * NANO_PER_USD == extra["cost_nano_usd"]
    return "ok", int(extra["cost_nano_usd"]), usage.total_tokens


async def via_grpc(
    stub: inference_pb2_grpc.InferenceStub,
    secret: str,
    max_tokens: int | None,
    *,
    request_id: str = "",
) -> Outcome:
    """The same chat straight to a core's gRPC port, outcomes named as the edge names them."""
    metadata = [("authorization", f"Bearer {secret}")]
    if request_id:
        metadata.append(("x-request-id", request_id))
    request = inference_pb2.ChatRequest(
        model=MODEL,
        messages=[inference_pb2.ChatMessage(role="user", content=PROMPT)],
        sampling=inference_pb2.Sampling(ignore_eos=True),
        max_tokens=max_tokens,
    )
    try:
        last = None
        async for chunk in stub.Chat(request, metadata=metadata, timeout=60):
            last = chunk
    except grpc.aio.AioRpcError as exc:
        return str(from_rpc(exc).body.code), 0, 0
    assert last is not None and last.finish_reason
    return "ok", last.usage.cost_nano_usd, last.usage.total_tokens


def new_workspace(
    admin: Client,
    *,
    credits_cents: int,
    limits: accounts_pb2.KeyLimits | None = None,
) -> tuple[str, str, str]:
    """(workspace id, key id, secret) of a fresh workspace with one key."""
    ws = admin.CreateWorkspace(
        accounts_pb2.CreateWorkspaceRequest(name="cluster", starter_credits_cents=credits_cents)
    )
    created = admin.CreateKey(
        accounts_pb2.CreateKeyRequest(workspace_id=ws.id, name="cluster", limits=limits)
    )
    return ws.id, created.key.id, created.secret
