"""Durability through the real processes: SIGTERM drains, kill -9 loses nothing acknowledged,
idempotent top-ups survive restarts."""

from __future__ import annotations

import asyncio
import random
import secrets
import signal
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from corvex.money import NANO_PER_USD
from corvex.v1 import accounts_pb2, accounts_pb2_grpc
from corvex_core import records
from corvex_core.journal import Journal
from corvex_ops.admin import Client
from corvex_ops.stack import StackError, running_stack
from tests.conftest import ADMIN_TOKEN, FAST_ENGINE, MODEL, STACK_CONFIG, new_account

pytestmark = pytest.mark.e2e


def config(**engine: Any) -> dict[str, Any]:
    core = dict(STACK_CONFIG["core"])
    core["engines"] = {"default": {**FAST_ENGINE, **engine}}
    core["drain_grace_s"] = 20
    return {"core": core}


def journal_records(data_dir: Path) -> list[records.Record]:
    recovery = Journal(data_dir).recover()
    assert recovery.state is None, "no snapshot expected in these short runs"
    return recovery.records


def test_sigterm_lets_streams_finish_and_exits_zero(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with running_stack(config=config(tpot_ms=10), data_dir=data_dir) as stack:
        admin = Client(stack.grpc_address, ADMIN_TOKEN)
        account = new_account(admin)
        admin.close()
        client = openai.OpenAI(
            base_url=stack.http_url + "/v1", api_key=account.secret, max_retries=0
        )

        def stream(index: int) -> tuple[str | None, int]:
            chunks = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"drain {index}"}],
                max_tokens=100,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
                extra_headers={"x-request-id": f"drain-{index}"},
            )
            finish, tokens = None, 0
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            return finish, tokens

        async def scenario() -> list[tuple[str | None, int]]:
            tasks = [asyncio.create_task(asyncio.to_thread(stream, i)) for i in range(5)]
            await asyncio.sleep(0.3)  # streams are ~1 s long: all in flight now
            stack.core.signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
            with pytest.raises(openai.APIStatusError) as refused:
                await asyncio.to_thread(
                    client.chat.completions.create,
                    model=MODEL,
                    messages=[{"role": "user", "content": "late"}],
                )
            assert refused.value.status_code == 503
            return await asyncio.gather(*tasks)

        results = asyncio.run(scenario())
        client.close()
        assert results == [("length", 100)] * 5
        assert stack.core.popen.wait(30) == 0
    charged = [r for r in journal_records(data_dir) if isinstance(r, records.Charged)]
    assert sorted(r.request_id for r in charged) == [f"drain-{i}" for i in range(5)]
    assert all(r.completion_tokens == 100 for r in charged)


async def _traffic(
    http_url: str, grpc_address: str, secret: str, workspace_id: str, kill_after: int, kill: Any
) -> tuple[dict[str, Decimal], set[str], set[str], set[str]]:
    """Streams and top-ups until the kill, which comes once `kill_after` streams have finished
    (a point in the traffic, not a time: a loaded machine only moves it later). Returns (costs
    seen by clients, acknowledged top-up keys, started request ids, cut request ids)."""
    costs: dict[str, Decimal] = {}
    started: set[str] = set()
    acknowledged: set[str] = set()
    stop = asyncio.Event()
    enough = asyncio.Event()

    async def request(client: openai.AsyncOpenAI, rid: str, max_tokens: int) -> None:
        started.add(rid)
        try:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": rid}],
                max_tokens=max_tokens,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
                extra_headers={"x-request-id": rid},
            )
            async for chunk in stream:
                if chunk.usage:
                    nano = (chunk.usage.model_extra or {})["cost_nano_usd"]
                    costs[rid] = Decimal(nano).scaleb(-9)
                    if len(costs) >= kill_after:
                        enough.set()
        except (openai.APIError, openai.APIConnectionError):
            pass

    async def topups() -> None:
        async with grpc.aio.insecure_channel(grpc_address) as channel:
            stub = accounts_pb2_grpc.AccountsStub(channel)
            while not stop.is_set():
                key = "topup-" + secrets.token_hex(6)
                try:
                    await stub.AddCredits(
                        accounts_pb2.AddCreditsRequest(
                            workspace_id=workspace_id, amount_cents=100, idempotency_key=key
                        ),
                        metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
                    )
                    acknowledged.add(key)
                except grpc.aio.AioRpcError:
                    return
                await asyncio.sleep(0.005)

    rng = random.Random(kill_after)
    async with openai.AsyncOpenAI(
        base_url=http_url + "/v1", api_key=secret, max_retries=0, timeout=30
    ) as client:
        tasks = [asyncio.create_task(topups())]
        for i in range(150):
            tasks.append(asyncio.create_task(request(client, f"r{i}", rng.randrange(20, 400))))
        await asyncio.wait_for(enough.wait(), timeout=120)
        kill()
        stop.set()
        await asyncio.gather(*tasks)
    cut = started - set(costs)
    return costs, acknowledged, started, cut


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_loses_nothing_acknowledged(tmp_path: Path, seed: int) -> None:
    data_dir = tmp_path / "data"
    kill_after = random.Random(seed).randrange(3, 40)  # streams finished before the kill
    with running_stack(config=config(tpot_ms=5), data_dir=data_dir) as stack:
        admin = Client(stack.grpc_address, ADMIN_TOKEN)
        account = new_account(admin, credits_cents=50_000)
        admin.close()
        costs, acknowledged, started, cut = asyncio.run(
            _traffic(
                stack.http_url,
                stack.grpc_address,
                account.secret,
                account.workspace_id,
                kill_after,
                lambda: stack.core.signal(signal.SIGKILL),
            )
        )
        assert stack.core.popen.wait(10) == -signal.SIGKILL
    assert len(started) == 150
    assert len(costs) >= kill_after

    # Restart on the same data directory: the ledger must be exactly what was acknowledged.
    with running_stack(config=config(), data_dir=data_dir, edge_port=None) as stack:
        admin = Client(stack.grpc_address, ADMIN_TOKEN)
        ws = admin.GetWorkspace(accounts_pb2.GetWorkspaceRequest(workspace_id=account.workspace_id))
        invoices = admin.ListInvoices(
            accounts_pb2.ListInvoicesRequest(workspace_id=account.workspace_id)
        ).invoices
        admin.close()
    invoice_keys = {i.idempotency_key for i in invoices}
    assert acknowledged <= invoice_keys, "an acknowledged top-up was lost"

    journal = journal_records(data_dir)
    charges = {r.request_id: r for r in journal if isinstance(r, records.Charged)}
    for rid, cost in costs.items():
        assert charges[rid].cost_nano == cost * NANO_PER_USD, f"{rid} charged differently"
    # Anything else charged was a stream the kill cut short, never a phantom.
    assert set(charges) - set(costs) <= cut
    credited = sum(r.amount_nano for r in journal if isinstance(r, records.CreditsAdded))
    assert ws.balance_nano_usd == credited - sum(r.cost_nano for r in charges.values())
    assert ws.held_nano_usd == 0


def test_idempotent_top_up_across_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    request = None
    with running_stack(config=config(), data_dir=data_dir, edge_port=None) as stack:
        admin = Client(stack.grpc_address, ADMIN_TOKEN)
        account = new_account(admin, credits_cents=0)
        request = accounts_pb2.AddCreditsRequest(
            workspace_id=account.workspace_id, amount_cents=2500, idempotency_key="order-42"
        )
        first = admin.AddCredits(request)
        again = admin.AddCredits(request)
        admin.close()
        assert not first.replayed and again.replayed
        assert again.invoice.number == first.invoice.number
        assert again.workspace.balance_nano_usd == 25 * NANO_PER_USD
        stack.core.signal(signal.SIGKILL)
        stack.core.popen.wait(10)
    with running_stack(config=config(), data_dir=data_dir, edge_port=None) as stack:
        admin = Client(stack.grpc_address, ADMIN_TOKEN)
        after = admin.AddCredits(request)
        admin.close()
    assert after.replayed and after.invoice.number == first.invoice.number
    assert after.workspace.balance_nano_usd == 25 * NANO_PER_USD


def test_core_refuses_to_start_on_a_damaged_journal(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with running_stack(config=config(), data_dir=data_dir, edge_port=None) as stack:
        admin = Client(stack.grpc_address, ADMIN_TOKEN)
        new_account(admin, credits_cents=500, name="victim")
        admin.close()
    db = data_dir / "journal.sqlite3"
    data = bytearray(db.read_bytes())
    data[data.index(b"victim")] ^= 0x20
    db.write_bytes(bytes(data))
    with (
        pytest.raises(StackError, match="fails its checksum"),
        running_stack(config=config(), data_dir=data_dir, edge_port=None),
    ):
        pass
