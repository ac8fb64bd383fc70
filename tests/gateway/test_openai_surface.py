"""The OpenAI surface agents and harnesses use, driven by the official `openai` SDK against the
real edge → core → simulated engine processes: structured output through `parse()` and the
stream helpers, a two-turn tool loop, n choices, log probabilities, reasoning, vLLM's extras and
continuous usage, and /v1/completions (text, token ids, echo, logprobs, streaming), each
metered exactly; every refusal a 400 naming its param."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx2 as httpx
import jsonschema
import openai
import pydantic
import pytest

from corvex.v1 import accounts_pb2
from corvex_ops.admin import Client
from corvex_ops.stack import Stack
from tests.conftest import MODEL, Account, new_account

pytestmark = pytest.mark.e2e

# Prices of MODEL, nano-USD per token.
INPUT_NANO, OUTPUT_NANO = 350, 1400


class Weather(pydantic.BaseModel):
    city: str
    days: int


class GetWeather(pydantic.BaseModel):
    """The forecast for a city."""

    city: str


@pytest.fixture(scope="module")
def account(admin: Client) -> Account:
    return new_account(admin, credits_cents=10_000)


@pytest.fixture
def client(stack: Stack, account: Account) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=stack.http_url + "/v1", api_key=account.secret, max_retries=0
    ) as sdk:
        yield sdk


def cost_nano(usage: Any) -> int:
    nano = usage.model_extra["cost_nano_usd"]
    assert isinstance(nano, int)
    # The number is the integer's exact decimal digits (floats of those digits agree).
    assert usage.model_extra["cost"] == float(Decimal(nano).scaleb(-9))
    return nano


def priced(prompt_tokens: int, completion_tokens: int) -> int:
    return prompt_tokens * INPUT_NANO + completion_tokens * OUTPUT_NANO


def balance(admin: Client, account: Account) -> int:
    workspace = admin.GetWorkspace(
        accounts_pb2.GetWorkspaceRequest(workspace_id=account.workspace_id)
    )
    return int(workspace.balance_nano_usd)


# ---- structured output ---------------------------------------------------------------------


def test_parse_returns_the_parsed_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "The weather in Paris for 3 days, as JSON."}],
        response_format=Weather,
        max_tokens=200,
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Weather)
    assert Weather.model_validate_json(message.content or "") == message.parsed
    assert completion.choices[0].finish_reason == "stop"


def test_json_object_and_json_schema_are_valid_json(client: openai.OpenAI) -> None:
    anything = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "any JSON object"}],
        response_format={"type": "json_object"},
        max_tokens=200,
    )
    assert isinstance(json.loads(anything.choices[0].message.content or ""), dict)
    schema = {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
        "required": ["tags"],
        "additionalProperties": False,
    }
    tagged = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "tags"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "tags", "schema": schema, "strict": True},
        },
        max_tokens=200,
    )
    jsonschema.validate(json.loads(tagged.choices[0].message.content or ""), schema)


def test_the_stream_helper_parses_the_streamed_answer(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model=MODEL,
        messages=[{"role": "user", "content": "The weather in Oslo, as JSON."}],
        response_format=Weather,
        max_tokens=200,
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(deltas) > 1
    message = final.choices[0].message
    assert isinstance(message.parsed, Weather)
    assert "".join(deltas) == message.content


def test_an_invalid_schema_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}},
            },
        )
    assert refused.value.param == "response_format"


# ---- tools ------------------------------------------------------------------------------------


def test_a_two_turn_tool_loop(client: openai.OpenAI) -> None:
    tools = [openai.pydantic_function_tool(GetWeather)]
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.parse(
        model=MODEL, messages=messages, tools=tools, tool_choice="required", max_tokens=100
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.function.name == "GetWeather"
    assert isinstance(call.function.parsed_arguments, GetWeather)
    messages.append(choice.message)  # the SDK's own message object, sent back as it is
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 °C."})
    second = client.chat.completions.create(
        model=MODEL, messages=messages, tools=tools, max_tokens=20
    )
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length")
    assert answer.message.content and not answer.message.tool_calls
    # The history was rendered for the model: the second prompt is the longer.
    assert second.usage is not None and first.usage is not None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_streamed_tool_calls_are_the_whole_answers_calls(client: openai.OpenAI) -> None:
    weather = openai.pydantic_function_tool(GetWeather)
    when = {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
        },
    }
    ask: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "weather and time in Rome"}],
        "tools": [weather, when],
        "tool_choice": "required",
        "max_tokens": 100,
        "seed": 4,
    }
    whole = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(**ask, stream=True))
    heads = [
        tc
        for c in chunks
        for tc in (c.choices[0].delta.tool_calls or [])
        if c.choices and tc.id is not None
    ]
    # Each call's first delta names it (index, id, type, name) and has no arguments yet.
    assert [(h.type, h.function and h.function.arguments) for h in heads] == [
        ("function", "")
    ] * len(heads)
    assert chunks[0].choices[0].delta.role == "assistant"
    with client.chat.completions.stream(**ask) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    expected = [
        (c.id, c.function.name, c.function.arguments)
        for c in whole.choices[0].message.tool_calls or []
    ]
    streamed = [
        (c.id, c.function.name, c.function.arguments)
        for c in final.choices[0].message.tool_calls or []
    ]
    assert streamed == expected and len(done) == len(expected) == len(heads)
    assert final.choices[0].finish_reason == "tool_calls"
    for event in done:
        if event.name == "GetWeather":
            assert isinstance(event.parsed_arguments, GetWeather)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [openai.pydantic_function_tool(GetWeather)],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "tool_choice",
        ),
        (
            {"tools": [openai.pydantic_function_tool(GetWeather)], "tool_choice": "sometimes"},
            "tool_choice",
        ),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
    ],
)
def test_tool_choices_that_do_not_fit_are_400s(
    client: openai.OpenAI, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], **fields
        )
    assert refused.value.param == param


# ---- n, logprobs, reasoning, extras ------------------------------------------------------------


def test_n_choices_bill_the_prompt_once(client: openai.OpenAI) -> None:
    ask: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "three ways"}],
        "max_tokens": 6,
        "n": 3,
        "seed": 7,
        "extra_body": {"ignore_eos": True},
    }
    whole = client.chat.completions.create(**ask)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    usage = whole.usage
    assert usage is not None and usage.completion_tokens == 18
    assert cost_nano(usage) == priced(usage.prompt_tokens, 18)
    chunks = list(
        client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
    )
    texts = ["", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in whole.choices]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 18
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1, 2]
    # The stream helper files each choice under its index (it refuses answers cut at
    # max_tokens, so these end on their own).
    ended = {**ask, "max_tokens": 500, "extra_body": {}}
    with client.chat.completions.stream(**ended) as stream:
        final = stream.get_final_completion()
    expected = client.chat.completions.create(**ended)
    assert [c.message.content for c in final.choices] == [
        c.message.content for c in expected.choices
    ]
    assert [c.finish_reason for c in final.choices] == ["stop"] * 3


def test_logprobs_whole_and_streamed(client: openai.OpenAI) -> None:
    ask: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "logprobs"}],
        "max_tokens": 5,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    whole = client.chat.completions.create(**ask)
    content = (whole.choices[0].logprobs and whole.choices[0].logprobs.content) or []
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and token.bytes == list(token.token.encode())
        assert len(token.top_logprobs) == 3
    streamed = [
        t
        for c in client.chat.completions.create(**ask, stream=True)
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content or []
    ]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**{**ask, "top_logprobs": 21})
    assert refused.value.param == "top_logprobs"


def test_reasoning_is_vllms_field_and_billed_as_output(client: openai.OpenAI) -> None:
    ask: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "think first"}],
        "max_tokens": 60,
        "reasoning_effort": "low",
        "temperature": 0,
    }
    whole = client.chat.completions.create(**ask)
    reasoning = (whole.choices[0].message.model_extra or {})["reasoning"]
    assert reasoning
    usage = whole.usage
    assert usage is not None and usage.completion_tokens_details is not None
    assert 0 < (usage.completion_tokens_details.reasoning_tokens or 0) < usage.completion_tokens
    streamed = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning", "")
        for c in client.chat.completions.create(**ask, stream=True)
        if c.choices
    )
    assert streamed == reasoning
    quiet = client.chat.completions.create(**{**ask, "extra_body": {"include_reasoning": False}})
    assert "reasoning" not in (quiet.choices[0].message.model_extra or {})
    assert quiet.usage is not None and quiet.usage.completion_tokens == usage.completion_tokens


def test_continuous_usage_counts_every_chunk_and_the_cost_comes_last(
    client: openai.OpenAI,
) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "count"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
            extra_body={"ignore_eos": True},
        )
    )
    assert all(c.usage is not None for c in chunks)
    running = [c.usage.completion_tokens for c in chunks[:-1] if c.usage]
    assert running == sorted(running) and running[-1] == 5
    prompt = {c.usage.prompt_tokens for c in chunks if c.usage}
    assert len(prompt) == 1
    last = chunks[-1].usage
    assert last is not None and chunks[-1].choices == []
    assert cost_nano(last) == priced(last.prompt_tokens, 5)
    assert all("cost" not in (c.usage.model_extra or {}) for c in chunks[:-1] if c.usage)


def test_vllm_sampling_extras(client: openai.OpenAI) -> None:
    base: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "extras"}],
        "max_tokens": 30,
        "temperature": 0,
    }
    plain = client.chat.completions.create(**base, extra_body={"ignore_eos": True})
    text = plain.choices[0].message.content or ""
    word = text.split()[3]
    kept = client.chat.completions.create(
        **base,
        stop=[word],
        extra_body={
            "ignore_eos": True,
            "include_stop_str_in_output": True,
            "top_k": 5,
            "min_p": 0.05,
            "repetition_penalty": 1.0,
        },
    )
    assert kept.choices[0].finish_reason == "stop"
    assert (kept.choices[0].model_extra or {})["stop_reason"] == word
    assert (kept.choices[0].message.content or "").endswith(word)
    for bias, param in (({"5": 101}, "logit_bias"), ({"99999999": 1}, "logit_bias")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**base, logit_bias=bias)
        assert refused.value.param == param
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**base, extra_body={"stop_token_ids": [99999999]})
    assert refused.value.param == "stop_token_ids"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**base, store=True)
    assert refused.value.param == "store"


# ---- /v1/completions ---------------------------------------------------------------------------


def test_completions_text_token_ids_and_echo(client: openai.OpenAI) -> None:
    text = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert text.object == "text_completion" and text.id.startswith("cmpl-")
    assert text.choices[0].finish_reason == "length" and text.choices[0].text
    assert text.usage is not None
    assert (text.usage.prompt_tokens, text.usage.completion_tokens) == (4, 4)
    assert cost_nano(text.usage) == priced(4, 4)
    ids = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2)
    assert ids.usage is not None and ids.usage.prompt_tokens == 3
    default = client.completions.create(
        model=MODEL, prompt="default length", extra_body={"ignore_eos": True}
    )
    assert default.usage is not None and default.usage.completion_tokens == 16
    echoed = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=3, echo=True, logprobs=2, n=2
    )
    for choice in echoed.choices:
        assert choice.text.startswith("Once upon a time")
        logprobs = choice.logprobs
        assert logprobs is not None and logprobs.tokens and logprobs.text_offset
        assert "".join(logprobs.tokens) == choice.text
        assert logprobs.token_logprobs is not None and logprobs.token_logprobs[0] is None
        assert logprobs.top_logprobs is not None and logprobs.top_logprobs[0] is None
        assert all(len(top) <= 2 for top in logprobs.top_logprobs[1:] if top is not None)
        assert logprobs.text_offset[:2] == [0, len(logprobs.tokens[0])]
    assert [c.index for c in echoed.choices] == [0, 1]


def test_completions_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Stream it",
            max_tokens=6,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    texts = ["", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert all(texts)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == 12 and cost_nano(usage) == priced(usage.prompt_tokens, 12)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": "x", "suffix": "after"}, "suffix"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": [10**9]}, "prompt"),
    ],
)
def test_what_completions_refuse(client: openai.OpenAI, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, **fields)
    assert refused.value.param == param


# ---- load harnesses' requests, served and metered ---------------------------------------------

# `vllm bench serve --backend openai` (vllm/benchmarks/lib/endpoint_request_func.py, 0.33) and
# guidellm's default text_completions request (guidellm 0.8.1, backends/openai), as sent.
VLLM_BENCH = {
    "model": MODEL,
    "prompt": "benchmark prompt words",
    "repetition_penalty": 1.0,
    "max_tokens": 7,
    "logprobs": None,
    "stream": True,
    "stream_options": {"include_usage": True},
    "ignore_eos": True,
}
GUIDELLM = {
    "model": MODEL,
    "stream": True,
    "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    "max_tokens": 7,
    "stop": None,
    "ignore_eos": True,
    "prompt": "benchmark prompt words",
}


@pytest.mark.parametrize("body", [VLLM_BENCH, GUIDELLM], ids=["vllm-bench", "guidellm"])
def test_harness_requests_are_served_and_metered(
    stack: Stack, admin: Client, body: dict[str, Any]
) -> None:
    account = new_account(admin, credits_cents=100)
    before = balance(admin, account)
    headers = {"Authorization": f"Bearer {account.secret}"}
    text, usage = "", None
    with httpx.stream(
        "POST", stack.http_url + "/v1/completions", json=body, headers=headers, timeout=30
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line.removeprefix("data: "))
            if data.get("choices"):
                text += data["choices"][0].get("text") or ""
            if data.get("usage"):
                usage = data["usage"]  # as guidellm reads it: the last one wins
    assert text and usage is not None
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (3, 7)
    assert usage["cost_nano_usd"] == priced(3, 7)
    assert before - balance(admin, account) == usage["cost_nano_usd"]
