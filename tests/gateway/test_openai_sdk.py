"""The edge as OpenAI SDK users see it: the real edge → core → simulated engine processes,
driven by the official `openai` client, sync and async."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal

import httpx2 as httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from corvex.v1 import accounts_pb2
from corvex_ops.admin import Client
from corvex_ops.stack import Stack
from tests.conftest import MODEL, Account, new_account

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def account(admin: Client) -> Account:
    return new_account(admin, credits_cents=10_000)


@pytest.fixture
def client(stack: Stack, account: Account) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=stack.http_url + "/v1", api_key=account.secret, max_retries=0
    ) as sdk:
        yield sdk


@pytest.fixture
async def aclient(stack: Stack, account: Account) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=stack.http_url + "/v1", api_key=account.secret, max_retries=0
    ) as sdk:
        yield sdk


def test_chat_completion(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=12,
        temperature=0,
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == MODEL
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None
    assert usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # The cost is exact: prompt at $0.35/1M, completion at $1.40/1M; a JSON number with the
    # charge's exact digits, and the same in integer nano-USD.
    expected = (
        usage.prompt_tokens * Decimal("0.35") + usage.completion_tokens * Decimal("1.40")
    ) / 10**6
    exact = json.loads(raw.http_response.text, parse_float=Decimal)["usage"]
    assert exact["cost"] == expected
    assert Decimal(exact["cost_nano_usd"]).scaleb(-9) == expected
    assert isinstance(usage.model_extra["cost"], float)


def test_greedy_answers_are_deterministic(client: openai.OpenAI) -> None:
    def ask() -> str | None:
        return (
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Same"}], temperature=0
            )
            .choices[0]
            .message.content
        )

    assert ask() == ask()


def test_content_parts_and_max_completion_tokens(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
        max_completion_tokens=3,
        extra_body={"ignore_eos": True},
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 3


def test_stop_string_ends_the_answer(client: openai.OpenAI) -> None:
    full = (
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "stop test"}],
            max_tokens=40,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .message.content
    )
    assert full is not None
    stop = full.split()[5]
    cut = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "stop test"}],
        max_tokens=40,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(stop)]


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Stream please"}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert content_chunks
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_streaming_without_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4, stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason is not None
    assert all(c.usage is None for c in chunks)


async def test_async_client_plain_and_streamed(aclient: openai.AsyncOpenAI) -> None:
    completion = await aclient.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "async"}], max_tokens=5
    )
    assert completion.choices[0].message.content
    text = ""
    stream = await aclient.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "async"}],
        max_tokens=5,
        stream=True,
        temperature=0,
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    greedy = await aclient.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "async"}], max_tokens=5, temperature=0
    )
    assert text == greedy.choices[0].message.content


def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model=MODEL, input=["one", "two"], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    vector = floats.data[0].embedding
    assert abs(sum(x * x for x in vector) - 1) < 1e-4
    assert floats.usage.prompt_tokens == 2
    raw = client.embeddings.with_raw_response.create(
        model=MODEL, input="one", encoding_format="base64"
    )
    encoded = raw.http_response.json()["data"][0]["embedding"]
    decoded = struct.unpack(f"<{len(vector)}f", base64.b64decode(encoded))
    assert decoded == pytest.approx(vector, abs=1e-6)
    # The SDK decodes base64 by itself when it asked for it.
    assert client.embeddings.create(model=MODEL, input="one").data[0].embedding == pytest.approx(
        vector, abs=1e-6
    )


def test_embeddings_token_input_and_dimensions(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model=MODEL, input=[[1, 2, 3], [4]], dimensions=8)
    assert [len(d.embedding) for d in result.data] == [8, 8]
    assert result.usage.prompt_tokens == 4
    # Ids beyond the model's vocabulary are refused as a completions prompt's are, not billed.
    for ids in ([32000], [2**32]):
        with pytest.raises(openai.BadRequestError) as outside:
            client.embeddings.create(model=MODEL, input=[[1], ids], dimensions=8)
        assert outside.value.param == "input"
        assert "vocabulary" in outside.value.message


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == [
        "zai-org/GLM-5.1-FP8",
        "moonshotai/Kimi-K2.6",
        "MiniMaxAI/MiniMax-M2.5",
        "deepseek-ai/DeepSeek-V4-Flash",
    ]
    flash = client.models.retrieve(MODEL)
    assert flash.id == MODEL and flash.object == "model" and flash.owned_by == "deepseek-ai"
    extra = flash.model_extra or {}
    assert extra["routes"] == ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    assert extra["pricing"] == {
        "currency": "USD",
        "unit": "per 1M tokens",
        "input": "0.35",
        "output": "1.40",
    }


def test_errors_raise_the_sdk_exception_with_the_code(client: openai.OpenAI, stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(
            model="nope/nope", messages=[{"role": "user", "content": "x"}]
        )
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as negative:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=-1
        )
    assert negative.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model=MODEL, messages=[])
    assert empty.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as huge:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=10**9
        )
    assert huge.value.code == "context_length_exceeded"
    assert huge.value.param == "messages" and "shorten the messages" in huge.value.message
    with pytest.raises(openai.BadRequestError) as beyond:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2**31
        )
    assert beyond.value.param == "max_tokens" and "from 1 to 2147483647" in beyond.value.message
    # Each endpoint's error names its own field.
    with pytest.raises(openai.BadRequestError) as huge:
        client.completions.create(model=MODEL, prompt=[1, 2], max_tokens=131071)
    assert huge.value.code == "context_length_exceeded"
    assert huge.value.param == "prompt" and "shorten the prompt" in huge.value.message
    with pytest.raises(openai.BadRequestError) as huge:
        client.embeddings.create(model=MODEL, input=[[1] * 131073])
    assert huge.value.code == "context_length_exceeded"
    assert huge.value.param == "input" and "an input has 131073 tokens" in huge.value.message
    with pytest.raises(openai.BadRequestError) as wrong_type:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            temperature="hot",  # type: ignore[arg-type]
        )
    assert wrong_type.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as n:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], n=17
        )
    assert n.value.param == "n"
    # n = 0 is refused before admission, which holds tokens for each of n choices.
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError) as zero:
        client.chat.completions.create(model=MODEL, messages=messages, n=0)
    assert zero.value.param == "n"
    assert zero.value.message.endswith("n must be between 1 and 16.")
    with pytest.raises(openai.BadRequestError) as zero:
        client.chat.completions.create(model=MODEL, messages=messages, n=0, stream=True)
    assert zero.value.param == "n"
    with pytest.raises(openai.BadRequestError) as zero:
        client.completions.create(model=MODEL, prompt="x", n=0)
    assert zero.value.param == "n"
    bad_key = openai.OpenAI(base_url=stack.http_url + "/v1", api_key="corvex-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        bad_key.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert auth.value.code == "invalid_api_key"


def test_broke_workspace_gets_402_but_models_still_work(stack: Stack, admin: Client) -> None:
    broke = new_account(admin, credits_cents=0)
    client = openai.OpenAI(base_url=stack.http_url + "/v1", api_key=broke.secret, max_retries=0)
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 402
    assert exc.value.code == "insufficient_credits"
    assert client.models.list().data


def test_revoked_key_stops_working(stack: Stack, admin: Client) -> None:
    account = new_account(admin)
    client = openai.OpenAI(base_url=stack.http_url + "/v1", api_key=account.secret, max_retries=0)
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1
    )
    admin.RevokeKey(accounts_pb2.RevokeKeyRequest(key_id=account.key_id))
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])


def test_raw_http_errors(stack: Stack, account: Account) -> None:
    headers = {"Authorization": f"Bearer {account.secret}"}
    with httpx.Client(base_url=stack.http_url, headers=headers) as http:
        malformed = http.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert malformed.status_code == 400
        assert malformed.json()["error"]["type"] == "invalid_request_error"
        too_big = http.post("/v1/chat/completions", content=b"x" * (5 * 1024 * 1024))
        assert too_big.status_code == 413
        assert "error" in too_big.json()
        unknown = http.get("/v1/nothing")
        assert unknown.status_code == 404 and unknown.json()["error"]["message"]
        wrong_method = http.get("/v1/chat/completions")
        assert wrong_method.status_code == 405 and "error" in wrong_method.json()
        no_key = httpx.post(
            stack.http_url + "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
        )
        assert no_key.status_code == 401
        assert no_key.json()["error"]["code"] == "invalid_api_key"
        # Two Authorization headers are not one credential, whichever comes first.
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        for pair in ((account.secret, "corvex-bad"), ("corvex-bad", account.secret)):
            twice = httpx.post(
                stack.http_url + "/v1/chat/completions",
                json=body,
                headers=[("Authorization", f"Bearer {secret}") for secret in pair],
            )
            assert twice.status_code == 401, twice.text
            assert "more than one Authorization" in twice.json()["error"]["message"]
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/ready").status_code == 200
