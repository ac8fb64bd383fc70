"""Races through the real stack: hundreds of concurrent requests against one small balance,
one spend cap, or one key's limits. Nothing may overspend, and the reported costs must add
up to the balance change to the nano-dollar."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from decimal import Decimal

import openai
import pytest

from corvex.money import NANO_PER_USD
from corvex.v1 import accounts_pb2
from corvex_ops.admin import Client
from corvex_ops.stack import Stack
from tests.conftest import MODEL, Account, new_account

pytestmark = pytest.mark.e2e

MAX_TOKENS = 1000
PROMPT = "Race me"


def balance_nano(admin: Client, workspace_id: str) -> int:
    ws = admin.GetWorkspace(accounts_pb2.GetWorkspaceRequest(workspace_id=workspace_id))
    assert ws.held_nano_usd == 0
    return int(ws.balance_nano_usd)


async def one_request(
    client: openai.AsyncOpenAI, max_tokens: int = MAX_TOKENS
) -> tuple[str, Decimal, int]:
    """('ok', cost, tokens) or (error code, 0, 0)."""
    try:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
    except openai.APIStatusError as exc:
        return str(exc.code), Decimal(0), 0
    assert usage is not None
    return "ok", Decimal((usage.model_extra or {})["cost_nano_usd"]).scaleb(-9), usage.total_tokens


async def race(
    stack: Stack, secret: str, count: int, max_tokens: int = MAX_TOKENS
) -> list[tuple[str, Decimal, int]]:
    async with openai.AsyncOpenAI(
        base_url=stack.http_url + "/v1", api_key=secret, max_retries=0, timeout=120
    ) as client:
        return await asyncio.gather(*(one_request(client, max_tokens) for _ in range(count)))


@pytest.fixture(scope="module")
def cost_nano(stack: Stack, admin: Client) -> Iterator[int]:
    """The exact cost of one race request, measured once."""
    probe = new_account(admin, credits_cents=100)
    [(status, cost, _)] = asyncio.run(race(stack, probe.secret, 1))
    assert status == "ok"
    yield int(cost * NANO_PER_USD)


def test_balance_race_admits_exactly_the_affordable(
    stack: Stack, admin: Client, cost_nano: int
) -> None:
    account = new_account(admin, credits_cents=3)  # $0.03: about 21 requests of ~$0.0014
    start = balance_nano(admin, account.workspace_id)
    affordable = start // cost_nano
    assert 15 <= affordable <= 30
    results = asyncio.run(race(stack, account.secret, 300))
    succeeded = [r for r in results if r[0] == "ok"]
    refused = [r for r in results if r[0] != "ok"]
    assert len(succeeded) == affordable
    assert {r[0] for r in refused} == {"insufficient_credits"}
    end = balance_nano(admin, account.workspace_id)
    assert end >= 0
    assert sum(r[1] for r in succeeded) * NANO_PER_USD == start - end


def test_spend_cap_race_stops_at_the_cap(stack: Stack, admin: Client, cost_nano: int) -> None:
    account = new_account(admin, credits_cents=10_000)
    admin.SetSpendCap(
        accounts_pb2.SetSpendCapRequest(workspace_id=account.workspace_id, cap_cents=3)
    )
    start = balance_nano(admin, account.workspace_id)
    results = asyncio.run(race(stack, account.secret, 300))
    succeeded = [r for r in results if r[0] == "ok"]
    assert len(succeeded) == (3 * 10**7) // cost_nano
    assert {r[0] for r in results if r[0] != "ok"} == {"insufficient_credits"}
    ws = admin.GetWorkspace(accounts_pb2.GetWorkspaceRequest(workspace_id=account.workspace_id))
    assert ws.month_spend_nano_usd <= 3 * 10**7
    assert sum(r[1] for r in succeeded) * NANO_PER_USD == start - ws.balance_nano_usd
    # Raising the cap unblocks the very next request.
    with openai.OpenAI(
        base_url=stack.http_url + "/v1", api_key=account.secret, max_retries=0
    ) as client:
        with pytest.raises(openai.APIStatusError) as capped:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS
            )
        assert capped.value.status_code == 402 and "cap" in capped.value.message
        admin.SetSpendCap(
            accounts_pb2.SetSpendCapRequest(workspace_id=account.workspace_id, cap_cents=100)
        )
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS
        )


def test_requests_per_minute_race(stack: Stack, admin: Client) -> None:
    account = new_account(
        admin, credits_cents=10_000, limits=accounts_pb2.KeyLimits(requests_per_minute=10)
    )
    started = time.monotonic()
    results = asyncio.run(race(stack, account.secret, 200, max_tokens=5))
    elapsed = time.monotonic() - started
    admitted = sum(1 for r in results if r[0] == "ok")
    # Documented bound: L + L·t/60 s for an interval of length t.
    assert 10 <= admitted <= 10 + int(10 * elapsed / 60)
    assert {r[0] for r in results if r[0] != "ok"} == {"rate_limit_exceeded"}


def test_tokens_per_minute_race(stack: Stack, admin: Client) -> None:
    account = new_account(
        admin, credits_cents=10_000, limits=accounts_pb2.KeyLimits(tokens_per_minute=5000)
    )
    started = time.monotonic()
    results = asyncio.run(race(stack, account.secret, 200, max_tokens=100))
    elapsed = time.monotonic() - started
    used = sum(r[2] for r in results if r[0] == "ok")
    assert 0 < used <= 5000 + int(5000 * elapsed / 60)
    assert {r[0] for r in results if r[0] != "ok"} == {"rate_limit_exceeded"}


def test_rate_limit_headers_and_sdk_retry(stack: Stack, admin: Client) -> None:
    account: Account = new_account(
        admin,
        credits_cents=1000,
        limits=accounts_pb2.KeyLimits(requests_per_minute=30, tokens_per_minute=1000),
    )
    base = stack.http_url + "/v1"
    with openai.OpenAI(base_url=base, api_key=account.secret, max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=500,
            extra_body={"ignore_eos": True},
        )
        headers = raw.headers
        assert headers["x-ratelimit-limit-requests"] == "30"
        assert headers["x-ratelimit-remaining-requests"] == "29"
        assert headers["x-ratelimit-reset-requests"] == "2s"
        assert headers["x-ratelimit-limit-tokens"] == "1000"
        # 1000 - (12 prompt + 500) tokens; then 29 requests of 13 tokens still fit.
        assert int(headers["x-ratelimit-remaining-tokens"]) == 488
        assert headers["x-ratelimit-reset-tokens"].endswith("s")
        with pytest.raises(openai.RateLimitError) as tokens_limited:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=480
            )
        assert tokens_limited.value.code == "rate_limit_exceeded"
        assert "tokens per minute" in tokens_limited.value.message
        assert 1 <= int(tokens_limited.value.response.headers["retry-after"]) <= 60
        # A refusal says where the limits stand, as an answer does: nothing was taken.
        refused = tokens_limited.value.response.headers
        assert refused["x-ratelimit-remaining-requests"] == "29"
        assert int(refused["x-ratelimit-remaining-tokens"]) == 488
        assert refused["x-ratelimit-limit-tokens"] == "1000"
        for _ in range(29):
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=1
            )
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=1
            )
        assert "requests per minute" in limited.value.message
        assert 1 <= float(limited.value.response.headers["retry-after"]) <= 2
        assert limited.value.response.headers["x-ratelimit-remaining-requests"] == "0"
        assert limited.value.response.headers["x-ratelimit-limit-requests"] == "30"
        with pytest.raises(openai.RateLimitError) as streamed:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": PROMPT}], stream=True
            )
        assert streamed.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    # The SDK waits as told and succeeds once the bucket has refilled one request.
    statuses: list[int] = []
    with openai.OpenAI(
        base_url=base, api_key=account.secret, max_retries=3, http_client=recording(statuses)
    ) as patient:
        patient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=1
        )
    assert statuses[0] == 429 and statuses[-1] == 200  # refused, waited as told, admitted


def recording(statuses: list[int]) -> openai.DefaultHttpxClient:
    """An HTTP client for the SDK that notes the status of every response it receives."""
    return openai.DefaultHttpxClient(
        event_hooks={"response": [lambda response: statuses.append(response.status_code)]}
    )


def test_monthly_token_limit_is_429_without_retry(stack: Stack, admin: Client) -> None:
    account = new_account(
        admin, credits_cents=1000, limits=accounts_pb2.KeyLimits(monthly_tokens=100)
    )
    statuses: list[int] = []
    with openai.OpenAI(
        base_url=stack.http_url + "/v1",
        api_key=account.secret,
        max_retries=2,
        http_client=recording(statuses),
    ) as client:
        # Without max_tokens the answer is cut to what the month allows.
        first = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            extra_body={"ignore_eos": False},
        )
        assert first.usage is not None and first.usage.total_tokens <= 100
        statuses.clear()
        with pytest.raises(openai.RateLimitError) as exc:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=200
            )
        assert exc.value.code == "token_limit_exceeded"
        assert "retry-after" not in exc.value.response.headers
        assert "x-ratelimit-remaining-requests" not in exc.value.response.headers  # no rpm set
        assert statuses == [429]  # x-should-retry: false, so the SDK does not retry
