"""Reserved endpoints through the real processes: rented with `corvex admin`, called with the
official OpenAI SDK through the edge, billed by the period from the prepaid balance, suspended at
$0 or at the cap and resumed by money, and a kill -9 of the core mid-period.

The core runs with one-second billing periods (core.reserved.period_s; the product's is a
minute), so hours of behaviour fit in seconds. Waits poll for a state with a deadline; nothing
asserts how long anything took.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from corvex.money import NANO_PER_CENT
from corvex.v1 import accounts_pb2
from corvex_core import records
from corvex_core.journal import Journal
from corvex_ops.admin import Client
from corvex_ops.stack import Stack, running_stack
from tests.conftest import ADMIN_TOKEN, STACK_CONFIG, Account, new_account
from tests.e2e.reserved import FLASH, balance, endpoint, wait_for

pytestmark = pytest.mark.e2e

MINIMAX = "minimax-m2.5-2gpu"  # $5.04 per replica-hour: 1,400,000 nano-USD per replica-second
pb = accounts_pb2


def reserved_config() -> dict[str, Any]:
    core = dict(STACK_CONFIG["core"])
    core["reserved"] = {
        "period_s": 1,
        "tick_s": 0.1,
        "pools": {FLASH: {"replicas": 2}, MINIMAX: {"replicas": 4}},
    }
    return {"core": core}


@pytest.fixture(scope="module")
def reserved_stack() -> Iterator[Stack]:
    with running_stack(config=reserved_config()) as stack:
        yield stack


@pytest.fixture(scope="module")
def admin(reserved_stack: Stack) -> Iterator[Client]:
    client = Client(reserved_stack.grpc_address, ADMIN_TOKEN)
    yield client
    client.close()


def cli(stack: Stack, *args: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "corvex_cli", "admin", "--core", stack.grpc_address,
         "--admin-token", ADMIN_TOKEN, *args],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return json.loads(done.stdout) if done.stdout.startswith(("{", "[")) else done.stdout


def sdk(stack: Stack, account: Account) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.http_url + "/v1", api_key=account.secret, max_retries=0)


def ask(client: openai.OpenAI, model: str) -> Any:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
    )


def test_rent_call_with_the_sdk_and_watch_it_bill(reserved_stack: Stack, admin: Client) -> None:
    owner = new_account(admin, credits_cents=1000, name="Acme")
    other = new_account(admin, credits_cents=1000, name="Other")
    offerings = cli(reserved_stack, "endpoint", "offerings")
    assert offerings["period_seconds"] == 1
    assert {o["id"]: o["replicas_free"] for o in offerings["offerings"]}[FLASH] == 2

    created = cli(
        reserved_stack, "endpoint", "create", owner.workspace_id,
        "--offering", FLASH, "--name", "prod", "--replicas", "2",
    )  # fmt: skip
    assert created["status"] == "running" and created["replicas"] == 2
    model = created["model"]
    assert model == f"acme-{owner.workspace_id[3:11]}/prod"

    with sdk(reserved_stack, owner) as client:
        reply = ask(client, model)
        assert reply.model == model and reply.choices[0].message.content
        assert reply.usage is not None and reply.usage.model_extra["cost_nano_usd"] == 0
        assert reply.usage.model_extra["cost"] == 0
        assert model in [m.id for m in client.models.list()]
        listed = client.models.retrieve(model)
        assert listed.model_extra["reserved_endpoint"]["id"] == created["id"]
    with sdk(reserved_stack, other) as client:
        assert model not in [m.id for m in client.models.list()]
        with pytest.raises(openai.NotFoundError) as hidden:
            ask(client, model)
        assert hidden.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(model)

    wait_for(lambda: endpoint(admin, created["id"]).periods_billed >= 4, "four periods billed")
    deleted = cli(reserved_stack, "endpoint", "delete", created["id"])
    assert deleted["status"] == "deleted" and deleted["held_usd"] == "0.00"
    final = endpoint(admin, created["id"])
    # Every period was two replicas for one second, and that is all the balance paid for.
    assert final.charged_nano_usd == final.periods_billed * 2 * 700_000
    assert balance(admin, owner.workspace_id) == 1000 * NANO_PER_CENT - final.charged_nano_usd
    csv_rows = cli(reserved_stack, "usage", owner.workspace_id, "--format", "csv").splitlines()[1:]
    hours = [row.split(",") for row in csv_rows if created["id"] in row]
    assert sum(int(row[8]) for row in hours) == final.periods_billed * 2
    assert cli(reserved_stack, "endpoint", "list", owner.workspace_id) == []


@pytest.mark.parametrize("limit", ["balance", "spend_cap"])
def test_suspended_at_the_limit_and_resumed_by_money(
    reserved_stack: Stack, admin: Client, limit: str
) -> None:
    by_cap = limit == "spend_cap"
    account = new_account(admin, credits_cents=1000 if by_cap else 1, name=f"s-{limit}")
    if by_cap:
        admin.SetSpendCap(pb.SetSpendCapRequest(workspace_id=account.workspace_id, cap_cents=1))
    created = admin.CreateEndpoint(
        pb.CreateEndpointRequest(
            workspace_id=account.workspace_id, offering=MINIMAX, replicas=2, name="burst"
        )
    )
    # One cent pays for three periods of two replicas ($0.0028 each), not a fourth.
    wait_for(
        lambda: endpoint(admin, created.id).status == pb.ENDPOINT_STATUS_SUSPENDED, "suspension"
    )
    suspended = endpoint(admin, created.id)
    assert suspended.periods_billed == 3 and suspended.suspended_by == limit
    assert suspended.charged_nano_usd == 3 * 2 * 1_400_000

    with sdk(reserved_stack, account) as client:
        with pytest.raises(openai.APIStatusError) as refused:
            ask(client, created.model)
        assert refused.value.status_code == 402
        assert refused.value.code == "insufficient_credits"
        assert "is suspended" in refused.value.message
        assert ("spend cap" if by_cap else "balance") in refused.value.message

        if by_cap:
            admin.SetSpendCap(
                pb.SetSpendCapRequest(workspace_id=account.workspace_id, cap_cents=500)
            )
        else:
            admin.AddCredits(
                pb.AddCreditsRequest(
                    workspace_id=account.workspace_id, amount_cents=100, idempotency_key="up"
                )
            )
        wait_for(
            lambda: endpoint(admin, created.id).status == pb.ENDPOINT_STATUS_RUNNING, "resumption"
        )
        assert ask(client, created.model).choices[0].message.content
    admin.DeleteEndpoint(pb.DeleteEndpointRequest(endpoint_id=created.id))
    final = endpoint(admin, created.id)
    assert final.periods_billed > 3
    credited = (1000 if by_cap else 101) * NANO_PER_CENT
    assert balance(admin, account.workspace_id) == credited - final.charged_nano_usd


def test_per_key_limits_apply_through_an_endpoint(reserved_stack: Stack, admin: Client) -> None:
    account = new_account(
        admin, credits_cents=1000, limits=pb.KeyLimits(requests_per_minute=2), name="limited"
    )
    created = admin.CreateEndpoint(
        pb.CreateEndpointRequest(
            workspace_id=account.workspace_id, offering=FLASH, replicas=1, name="limited"
        )
    )
    with sdk(reserved_stack, account) as client:
        ask(client, created.model)
        ask(client, created.model)
        with pytest.raises(openai.RateLimitError) as limited:
            ask(client, created.model)
    assert limited.value.code == "rate_limit_exceeded"
    admin.DeleteEndpoint(pb.DeleteEndpointRequest(endpoint_id=created.id))


def test_kill_9_mid_period_bills_no_period_twice_and_loses_none(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with running_stack(config=reserved_config(), data_dir=data_dir, edge_port=None) as stack:
        admin = Client(stack.grpc_address, ADMIN_TOKEN)
        account = new_account(admin, credits_cents=1000, name="crash")
        created = admin.CreateEndpoint(
            pb.CreateEndpointRequest(
                workspace_id=account.workspace_id, offering=FLASH, replicas=1, name="crash"
            )
        )
        wait_for(lambda: endpoint(admin, created.id).periods_billed >= 3, "three periods")
        seen = endpoint(admin, created.id).periods_billed
        # A write acknowledged after the periods seen: they are on disk before it is.
        admin.AddCredits(
            pb.AddCreditsRequest(
                workspace_id=account.workspace_id, amount_cents=100, idempotency_key="before-kill"
            )
        )
        admin.close()
        stack.core.signal(signal.SIGKILL)
        assert stack.core.popen.wait(10) == -signal.SIGKILL

    with running_stack(config=reserved_config(), data_dir=data_dir, edge_port=None) as stack:
        admin = Client(stack.grpc_address, ADMIN_TOKEN)
        wait_for(
            lambda: endpoint(admin, created.id).periods_billed >= seen + 3,
            "billing to go on after the restart",
        )
        admin.DeleteEndpoint(pb.DeleteEndpointRequest(endpoint_id=created.id))
        after = endpoint(admin, created.id)
        final_balance = balance(admin, account.workspace_id)
        admin.close()

    journal = Journal(data_dir).recover().records
    periods = [
        r
        for r in journal
        if isinstance(r, records.EndpointPeriodCharged) and r.endpoint_id == created.id
    ]
    # Each period id once, none skipped, none overlapping another.
    assert [p.period for p in periods] == list(range(1, len(periods) + 1))
    assert all(b.start_ms >= a.end_ms for a, b in itertools.pairwise(periods))
    assert len(periods) == after.periods_billed >= seen + 3
    # What the balance paid is exactly the periods the journal holds.
    assert {p.cost_nano for p in periods} == {700_000}
    assert after.charged_nano_usd == sum(p.cost_nano for p in periods)
    assert final_balance == 1100 * NANO_PER_CENT - after.charged_nano_usd
