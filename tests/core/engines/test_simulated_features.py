"""The simulated engine's OpenAI surface: n, logprobs, logit_bias, stop token ids, tools,
reasoning, structured output and completions prompts. Deterministic outputs, no timings."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest

from corvex_core.config import SimulatedEngineConfig
from corvex_core.engines.base import (
    MAX_TOOLS,
    ChatContext,
    ChatMessage,
    Delta,
    EngineRequestError,
    FinishReason,
    Prompt,
    ResponseFormat,
    ResponseFormatType,
    SamplingOptions,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
)
from corvex_core.engines.simulated import (
    SimulatedEngine,
    count_text_tokens,
    token_id,
    token_text,
)

INSTANT = SimulatedEngineConfig(ttft_ms=0, tpot_ms=0, prefill_ms_per_1k_tokens=0)
VOCAB = INSTANT.vocab_size

WEATHER = Tool(
    name="get_weather",
    description="The weather in a city.",
    parameters={
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "unit", "days"],
        "additionalProperties": False,
    },
    strict=True,
)
ADD = Tool(
    name="add",
    parameters={
        "type": "object",
        "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
        "required": ["a", "b"],
    },
)
NOTHING = Tool(name="ping")


@contextlib.asynccontextmanager
async def running(config: SimulatedEngineConfig = INSTANT) -> AsyncIterator[SimulatedEngine]:
    engine = SimulatedEngine("org/model", config)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


async def chat_prompt(
    engine: SimulatedEngine, text: str = "hello", context: ChatContext | None = None
) -> Prompt:
    return await engine.render_chat([ChatMessage(role="user", content=text)], context)


async def run(engine: SimulatedEngine, prompt: Prompt, **options: Any) -> list[Delta]:
    opts = SamplingOptions(**{"max_tokens": 64, **options})
    return [d async for d in engine.generate("r", prompt, opts)]


def of_choice(deltas: list[Delta], index: int) -> list[Delta]:
    return [d for d in deltas if d.index == index]


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


def calls_of(deltas: list[Delta]) -> list[dict[str, str]]:
    """The tool calls of one choice, assembled from their pieces as an OpenAI client does."""
    calls: dict[int, dict[str, str]] = {}
    for delta in deltas:
        for piece in delta.tool_calls:
            if piece.index not in calls:
                assert piece.id is not None and piece.name is not None  # id and name come first
                calls[piece.index] = {"id": piece.id, "name": piece.name, "arguments": ""}
            else:
                assert piece.id is None and piece.name is None
            calls[piece.index]["arguments"] += piece.arguments
    return [calls[i] for i in sorted(calls)]


# -- n ------------------------------------------------------------------------------------------


async def test_n_choices_each_end_and_only_the_last_delta_carries_the_prompt_count() -> None:
    async with running() as engine:
        prompt = await chat_prompt(engine)
        deltas = await run(engine, prompt, n=3, seed=5, temperature=0.7, max_tokens=30)
    assert {d.index for d in deltas} == {0, 1, 2}
    for index in range(3):
        finishes = [d.finish_reason for d in of_choice(deltas, index) if d.finish_reason]
        assert len(finishes) == 1
    assert [d.prompt_tokens for d in deltas if d.prompt_tokens is not None] == [prompt.num_tokens]
    assert deltas[-1].is_last and not any(d.is_last for d in deltas[:-1])
    texts = {text_of(of_choice(deltas, i)) for i in range(3)}
    assert len(texts) == 3  # sampled choices differ


async def test_choice_i_samples_with_seed_plus_i_and_greedy_choices_are_alike() -> None:
    async with running() as engine:
        prompt = await chat_prompt(engine)
        three = await run(engine, prompt, n=3, seed=10, temperature=1.0)
        alone = await run(engine, prompt, seed=12, temperature=1.0)
        greedy = await run(engine, prompt, n=2, temperature=0)
    # Choice 2 of seed 10 is choice 0 of seed 12 in text (its length is its own).
    choice_two = text_of(of_choice(three, 2)).split()
    assert choice_two == text_of(alone).split()[: len(choice_two)]
    assert text_of(of_choice(greedy, 0)) == text_of(of_choice(greedy, 1))


async def test_counts_per_choice_add_up() -> None:
    async with running() as engine:
        deltas = await run(engine, await chat_prompt(engine), n=2, max_tokens=9, ignore_eos=True)
    assert [sum(d.num_tokens for d in of_choice(deltas, i)) for i in (0, 1)] == [9, 9]
    assert all(d.finish_reason in (None, FinishReason.LENGTH) for d in deltas)


# -- logprobs -----------------------------------------------------------------------------------


async def test_logprobs_cover_every_token_sorted_with_the_greedy_token_first() -> None:
    async with running() as engine:
        prompt = await chat_prompt(engine)
        deltas = await run(engine, prompt, temperature=0, logprobs=5, max_tokens=20)
        again = await run(engine, prompt, temperature=0, logprobs=5, max_tokens=20)
        plain = await run(engine, prompt, temperature=0, max_tokens=20)
    entries = [e for d in deltas for e in d.logprobs]
    assert len(entries) == sum(d.num_tokens for d in deltas)
    assert "".join(e.token for e in entries) == text_of(deltas)
    for entry in entries:
        assert entry.logprob is not None and entry.logprob < 0
        assert len(entry.top) == 5
        assert [c.logprob for c in entry.top] == sorted(
            (c.logprob for c in entry.top), reverse=True
        )
        assert entry.top[0].token_id == entry.token_id  # greedy takes the most likely token
        assert len({c.token_id for c in entry.top}) == 5
    assert entries == [e for d in again for e in d.logprobs]
    assert text_of(plain) == text_of(deltas)  # asking for logprobs changes nothing else
    assert all(d.logprobs == () for d in plain)


async def test_logprobs_zero_gives_the_sampled_token_only() -> None:
    async with running() as engine:
        deltas = await run(engine, await chat_prompt(engine), logprobs=0, max_tokens=5)
    entries = [e for d in deltas for e in d.logprobs]
    assert len(entries) == 5 and all(e.top == () for e in entries)


@pytest.mark.parametrize("value", [-1, 21])
async def test_top_logprobs_beyond_twenty_are_refused(value: int) -> None:
    async with running() as engine:
        with pytest.raises(EngineRequestError) as refused:
            await run(engine, await chat_prompt(engine), logprobs=value)
    assert refused.value.param == "top_logprobs"


# -- logit_bias and stop token ids ----------------------------------------------------------------


async def test_a_bias_of_100_forces_a_token_and_minus_100_bans_one() -> None:
    async with running() as engine:
        prompt = await chat_prompt(engine, "bias")
        plain = text_of(await run(engine, prompt, temperature=0, ignore_eos=True, max_tokens=30))
        forced = await run(engine, prompt, logit_bias={token_id("ledger", VOCAB): 100.0})
        banned_words = set(plain.split())
        bans = {token_id(w, VOCAB): -100.0 for w in banned_words}
        banned = text_of(
            await run(
                engine, prompt, temperature=0, ignore_eos=True, max_tokens=30, logit_bias=bans
            )
        )
        numbered = text_of(await run(engine, prompt, logit_bias={31_999: 100}, max_tokens=3))
    assert set(text_of(forced).split()) == {"ledger"}
    assert banned_words.isdisjoint(banned.split())
    assert count_text_tokens(banned) == 30
    assert numbered.split() == ["t31999"] * 3
    assert token_text(31_999) == "t31999"


@pytest.mark.parametrize(
    "bias", [{VOCAB: 1.0}, {-1: 1.0}, {5: 100.5}, {i: 1.0 for i in range(301)}]
)
async def test_logit_bias_outside_the_vocabulary_or_range_is_refused(
    bias: dict[int, float],
) -> None:
    async with running() as engine:
        with pytest.raises(EngineRequestError) as refused:
            await run(engine, await chat_prompt(engine), logit_bias=bias)
    assert refused.value.param == "logit_bias"


async def test_a_stop_token_id_ends_the_answer_and_is_counted() -> None:
    async with running() as engine:
        prompt = await chat_prompt(engine, "stop ids")
        plain = text_of(await run(engine, prompt, temperature=0, ignore_eos=True, max_tokens=40))
        words = plain.split()
        stop_word = words[6]
        cut = words.index(stop_word)
        stop_id = token_id(stop_word, VOCAB)
        deltas = await run(
            engine, prompt, temperature=0, ignore_eos=True, max_tokens=40, stop_token_ids=(stop_id,)
        )
        kept = await run(
            engine,
            prompt,
            temperature=0,
            ignore_eos=True,
            max_tokens=40,
            stop_token_ids=(stop_id,),
            include_stop_str_in_output=True,
        )
        with pytest.raises(EngineRequestError) as refused:
            await run(engine, prompt, stop_token_ids=(VOCAB,))
    assert text_of(deltas).split() == words[:cut]
    assert sum(d.num_tokens for d in deltas) == cut + 1
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == (FinishReason.STOP, stop_id)
    assert text_of(kept).split() == words[: cut + 1]
    assert refused.value.param == "stop_token_ids"


async def test_include_stop_str_in_output_keeps_the_stop_string() -> None:
    async with running() as engine:
        prompt = await chat_prompt(engine, "stops")
        full = text_of(await run(engine, prompt, temperature=0, ignore_eos=True))
        stop = full.split()[4]
        deltas = await run(
            engine,
            prompt,
            temperature=0,
            ignore_eos=True,
            stop=(stop,),
            include_stop_str_in_output=True,
        )
    assert text_of(deltas) == full[: full.index(stop) + len(stop)]
    assert deltas[-1].stop_reason == stop


# -- tools --------------------------------------------------------------------------------------


def tools_context(mode: ToolChoiceMode, name: str | None = None, **kwargs: Any) -> ChatContext:
    return ChatContext(
        tools=(WEATHER, ADD, NOTHING), tool_choice=ToolChoice(mode=mode, name=name), **kwargs
    )


async def test_a_required_tool_choice_answers_with_calls_valid_for_their_schemas() -> None:
    schemas = {t.name: t.parameters or {"type": "object"} for t in (WEATHER, ADD, NOTHING)}
    async with running() as engine:
        for seed in range(12):
            prompt = await chat_prompt(
                engine, f"call {seed}", tools_context(ToolChoiceMode.REQUIRED)
            )
            deltas = await run(engine, prompt, seed=seed, temperature=1.0, max_tokens=200)
            calls = calls_of(deltas)
            assert 1 <= len(calls) <= 2
            for call in calls:
                assert call["id"].startswith("call_")
                jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])
            assert text_of(deltas) == ""
            assert deltas[-1].finish_reason is FinishReason.TOOL_CALLS
            assert sum(d.num_tokens for d in deltas) == sum(
                1 + count_text_tokens(c["arguments"]) for c in calls
            )


async def test_a_named_tool_choice_calls_that_function_once() -> None:
    async with running() as engine:
        context = tools_context(ToolChoiceMode.NAMED, "get_weather")
        deltas = await run(engine, await chat_prompt(engine, "weather?", context), max_tokens=200)
    (call,) = calls_of(deltas)
    assert call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER.parameters or {})


async def test_tool_choice_none_answers_in_text() -> None:
    async with running() as engine:
        context = tools_context(ToolChoiceMode.NONE)
        deltas = await run(engine, await chat_prompt(engine, "x", context))
    assert calls_of(deltas) == [] and text_of(deltas)
    assert deltas[-1].finish_reason is not FinishReason.TOOL_CALLS


async def test_auto_calls_for_some_prompts_and_answers_after_the_tool_results() -> None:
    outcomes = set()
    async with running() as engine:
        for n in range(16):
            prompt = await chat_prompt(engine, f"question {n}", tools_context(ToolChoiceMode.AUTO))
            deltas = await run(engine, prompt, temperature=0, max_tokens=200)
            outcomes.add(deltas[-1].finish_reason)
        # The second turn of an agent loop: the call, its result, and then the answer.
        history = [
            ChatMessage(role="user", content="weather in Paris?"),
            ChatMessage(
                role="assistant",
                content="",
                tool_calls=(ToolCall(id="call_1", name="get_weather", arguments='{"city": "P"}'),),
            ),
            ChatMessage(role="tool", content="sunny", tool_call_id="call_1"),
        ]
        second = await engine.render_chat(history, tools_context(ToolChoiceMode.AUTO))
        answer = await run(engine, second, temperature=0)
    assert outcomes == {FinishReason.TOOL_CALLS, FinishReason.STOP}
    assert calls_of(answer) == [] and text_of(answer)
    assert "call_1" in second.text and "sunny" in second.text


async def test_a_slow_consumer_gets_each_calls_pieces_merged() -> None:
    async with running() as engine:
        prompt = await chat_prompt(engine, "merge", tools_context(ToolChoiceMode.NAMED, "add"))
        stream = engine.generate("r", prompt, SamplingOptions(max_tokens=200))
        first = await anext(stream)
        while engine.stats().running:  # noqa: ASYNC110 (behind until the answer is done)
            await asyncio.sleep(0)
        rest = [d async for d in stream]
    assert first.tool_calls[0].name == "add"
    assert len([p for d in rest for p in d.tool_calls]) == 1
    json.loads(calls_of([first, *rest])[0]["arguments"])


async def test_max_tokens_can_cut_a_tool_call_short() -> None:
    async with running() as engine:
        prompt = await chat_prompt(
            engine, "cut", tools_context(ToolChoiceMode.NAMED, "get_weather")
        )
        deltas = await run(engine, prompt, max_tokens=4)
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert sum(d.num_tokens for d in deltas) == 4


@pytest.mark.parametrize(
    ("context", "param"),
    [
        (ChatContext(tool_choice=ToolChoice(mode=ToolChoiceMode.REQUIRED)), "tool_choice"),
        (tools_context(ToolChoiceMode.NAMED, "missing"), "tool_choice"),
        (ChatContext(tools=(Tool(name="bad name!"),)), "tools"),
        (ChatContext(tools=(NOTHING, NOTHING)), "tools"),
        (ChatContext(tools=(Tool(name="f", parameters={"type": "nope"}),)), "tools"),
        (ChatContext(tools=tuple(Tool(name=f"f{i}") for i in range(MAX_TOOLS + 1))), "tools"),
        (ChatContext(reasoning_effort="extreme"), "reasoning_effort"),
        (ChatContext(template_kwargs={f"k{i}": i for i in range(33)}), "chat_template_kwargs"),
    ],
)
async def test_a_chat_context_out_of_bounds_is_refused(context: ChatContext, param: str) -> None:
    async with running() as engine:
        with pytest.raises(EngineRequestError) as refused:
            await chat_prompt(engine, "x", context)
    assert refused.value.param == param


async def test_a_tool_schema_the_simulation_cannot_generate_is_refused_when_called() -> None:
    tool = Tool(
        name="f",
        parameters={
            "type": "object",
            "properties": {"x": {"type": "string", "pattern": "^a$"}},
            "required": ["x"],
        },
    )
    async with running() as engine:
        prompt = await chat_prompt(
            engine, "x", ChatContext(tools=(tool,), tool_choice=ToolChoice(ToolChoiceMode.REQUIRED))
        )
        with pytest.raises(EngineRequestError) as refused:
            await run(engine, prompt)
    assert refused.value.param == "tools" and "pattern" in str(refused.value)


# -- reasoning ----------------------------------------------------------------------------------


async def test_reasoning_comes_first_and_is_counted_as_output() -> None:
    async with running() as engine:
        prompt = await chat_prompt(engine, "think", ChatContext(reasoning_effort="low"))
        deltas = await run(engine, prompt, temperature=0, ignore_eos=True, max_tokens=30)
        hidden = await run(
            engine,
            await chat_prompt(
                engine, "think", ChatContext(reasoning_effort="low", include_reasoning=False)
            ),
            temperature=0,
            ignore_eos=True,
            max_tokens=30,
        )
    reasoning = "".join(d.reasoning for d in deltas)
    reasoning_tokens = sum(d.reasoning_tokens for d in deltas)
    assert 8 <= reasoning_tokens <= 12 and count_text_tokens(reasoning) == reasoning_tokens
    assert count_text_tokens(reasoning) + count_text_tokens(text_of(deltas)) == 30
    first_text = next(i for i, d in enumerate(deltas) if d.text)
    assert all(not d.reasoning for d in deltas[first_text + 1 :])
    assert "".join(d.reasoning for d in hidden) == ""
    assert sum(d.reasoning_tokens for d in hidden) == reasoning_tokens
    assert text_of(hidden) == text_of(deltas)


@pytest.mark.parametrize(
    ("context", "thinks"),
    [
        (None, False),
        (ChatContext(), False),
        (ChatContext(reasoning_effort="none"), False),
        (ChatContext(template_kwargs={"enable_thinking": True}), True),
        (ChatContext(template_kwargs={"thinking": True}), True),
        (ChatContext(reasoning_effort="high", template_kwargs={"enable_thinking": False}), False),
    ],
)
async def test_reasoning_is_switched_by_effort_or_template_kwargs(
    context: ChatContext | None, thinks: bool
) -> None:
    async with running() as engine:
        deltas = await run(engine, await chat_prompt(engine, "x", context))
    assert bool("".join(d.reasoning for d in deltas)) is thinks


async def test_a_model_that_thinks_by_default() -> None:
    config = SimulatedEngineConfig(ttft_ms=0, tpot_ms=0, prefill_ms_per_1k_tokens=0, reasoning=True)
    async with running(config) as engine:
        deltas = await run(engine, await chat_prompt(engine, "x", ChatContext()))
    assert "".join(d.reasoning for d in deltas)


# -- structured output --------------------------------------------------------------------------

SCHEMAS: list[dict[str, Any]] = [
    WEATHER.parameters or {},
    {
        "type": "object",
        "properties": {
            "steps": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"explanation": {"type": "string"}, "output": {"type": "string"}},
                    "required": ["explanation", "output"],
                    "additionalProperties": False,
                },
            },
            "final_answer": {"type": "string"},
        },
        "required": ["steps", "final_answer"],
        "additionalProperties": False,
    },
    {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
                "required": ["name", "children"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    },
    {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "null"}]},
            "kind": {"const": "ratio"},
            "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2},
            "when": {"type": "string", "format": "date-time"},
        },
        "required": ["value", "kind", "flags", "when"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "multipleOf": 5, "exclusiveMinimum": 0}},
]


@pytest.mark.parametrize("schema", SCHEMAS)
async def test_json_schema_answers_are_valid_for_the_schema(schema: dict[str, Any]) -> None:
    response_format = ResponseFormat(
        type=ResponseFormatType.JSON_SCHEMA, schema=schema, name="answer", strict=True
    )
    async with running() as engine:
        prompt = await chat_prompt(engine, "json")
        for seed in range(8):
            deltas = await run(
                engine, prompt, seed=seed, max_tokens=2000, response_format=response_format
            )
            text = text_of(deltas)
            jsonschema.validate(json.loads(text), schema)
            assert deltas[-1].finish_reason is FinishReason.STOP
            assert sum(d.num_tokens for d in deltas) == count_text_tokens(text)
        again = await run(engine, prompt, seed=3, max_tokens=2000, response_format=response_format)
        same = await run(engine, prompt, seed=3, max_tokens=2000, response_format=response_format)
    assert text_of(again) == text_of(same)


async def test_json_object_answers_are_objects_and_reasoning_comes_before_them() -> None:
    async with running() as engine:
        prompt = await chat_prompt(engine, "obj", ChatContext(reasoning_effort="minimal"))
        deltas = await run(
            engine, prompt, response_format=ResponseFormat(type=ResponseFormatType.JSON_OBJECT)
        )
    assert isinstance(json.loads(text_of(deltas)), dict)
    assert "".join(d.reasoning for d in deltas)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "strange"},
        {
            "type": "object",
            "properties": {"a": {"type": "string", "pattern": "^[a-z]+$"}},
            "required": ["a"],
        },
        {"type": "integer", "minimum": 5, "maximum": 1},
        {"type": "object", "properties": {"n": {"$ref": "#"}}, "required": ["n"]},
    ],
)
async def test_a_schema_that_is_invalid_or_cannot_be_generated_is_refused(
    schema: dict[str, Any],
) -> None:
    response_format = ResponseFormat(type=ResponseFormatType.JSON_SCHEMA, schema=schema)
    async with running() as engine:
        with pytest.raises(EngineRequestError) as refused:
            await run(engine, await chat_prompt(engine), response_format=response_format)
    assert refused.value.param == "response_format"


# -- completions prompts ------------------------------------------------------------------------


async def test_a_completions_prompt_has_no_template() -> None:
    async with running() as engine:
        prompt = await engine.render_completion("Once upon a time")
        ids = await engine.render_completion([token_id("ledger", VOCAB), 31_000, 7])
        with pytest.raises(EngineRequestError) as refused:
            await engine.render_completion([VOCAB])
        deltas = await run(engine, prompt, max_tokens=5, ignore_eos=True)
    assert (prompt.text, prompt.num_tokens, prompt.chat) == ("Once upon a time", 4, None)
    assert (ids.text, ids.num_tokens) == ("ledger t31000 " + token_text(7), 3)
    assert refused.value.param == "prompt"
    assert deltas[-1].prompt_tokens == 4


async def test_prompt_logprobs_cover_the_prompt_on_the_first_delta() -> None:
    async with running() as engine:
        prompt = await engine.render_completion("the ledger keeps exact counts")
        deltas = await run(engine, prompt, max_tokens=3, prompt_logprobs=2, logprobs=1)
    entries = deltas[0].prompt_logprobs
    assert entries is not None and len(entries) == prompt.num_tokens
    assert entries[0].logprob is None
    assert "".join(e.token for e in entries) == prompt.text
    assert all(e.logprob is not None and e.logprob < 0 and len(e.top) == 2 for e in entries[1:])
    assert all(d.prompt_logprobs is None for d in deltas[1:])
