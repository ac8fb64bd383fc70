"""The vLLM adapter's tools, reasoning, structured output, logprobs, n, sampling extras and
completions paths, against the fake vllm: what reaches vLLM, and what vLLM's own parsers and
stream processor make of the model's output."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from types import ModuleType
from typing import Any

import pytest

from corvex_core.config import VllmEngineConfig
from corvex_core.engines.base import (
    ChatContext,
    ChatMessage,
    Delta,
    EngineRequestError,
    EngineUnavailableError,
    FinishReason,
    ResponseFormat,
    ResponseFormatType,
    SamplingOptions,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
)
from corvex_core.engines.vllm import VllmEngine

MODEL = "acme/chat-1"
HI = [ChatMessage(role="user", content="Hi")]
WEATHER = Tool(
    name="get_weather",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
)
TOOLS = ChatContext(tools=(WEATHER,))
TIMEOUT_S = 5.0

EngineFactory = Callable[..., Awaitable[VllmEngine]]


@pytest.fixture
async def make_engine(fake_vllm: ModuleType) -> AsyncIterator[EngineFactory]:
    engines: list[VllmEngine] = []

    async def make(**config: Any) -> VllmEngine:
        engine = VllmEngine(
            MODEL, VllmEngineConfig(model="/weights/chat-1", **config), context_length=4096
        )
        engines.append(engine)
        await engine.start()
        return engine

    yield make
    for engine in engines:
        await engine.shutdown()


def fake_llm(fake_vllm: ModuleType) -> Any:
    return fake_vllm.ENGINES[-1]


async def run(engine: VllmEngine, prompt: Any, **options: Any) -> list[Delta]:
    opts = SamplingOptions(**{"max_tokens": 64, **options})
    async with asyncio.timeout(TIMEOUT_S):
        return [d async for d in engine.generate("r", prompt, opts)]


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


# -- tools --------------------------------------------------------------------------------------


async def test_tools_reach_the_template_and_vllms_parser_finds_the_call(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine(tool_call_parser="hermes")
    prompt = await engine.render_chat(HI, TOOLS)
    assert "<|tools|> get_weather <|end|>" in prompt.text
    fake_llm(fake_vllm).script = [
        "Checking.",
        "<tool_call>",
        '{"name":"get_weather","arguments":{"city":"Paris"}}',
        "</tool_call>",
    ]
    deltas = await run(engine, prompt)
    pieces = [p for d in deltas for p in d.tool_calls]
    assert [(p.index, p.name) for p in pieces] == [(0, "get_weather")]
    assert pieces[0].id is not None
    assert json.loads(pieces[0].arguments) == {"city": "Paris"}
    assert text_of(deltas).strip() == "Checking."
    assert deltas[-1].finish_reason is FinishReason.TOOL_CALLS
    # Every generated token is billed, the markup's and the end of sequence too.
    assert sum(d.num_tokens for d in deltas) == 5


async def test_a_named_tool_choice_is_vllms_structured_output_and_ends_with_stop(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine(tool_call_parser="hermes")
    context = ChatContext(
        tools=(WEATHER,), tool_choice=ToolChoice(ToolChoiceMode.NAMED, "get_weather")
    )
    prompt = await engine.render_chat(HI, context)
    llm = fake_llm(fake_vllm)
    llm.script = ['{"city":"Oslo"}']
    deltas = await run(engine, prompt)
    (params,) = llm.sent_params
    assert params.structured_outputs.json == WEATHER.parameters
    (call,) = [p for d in deltas for p in d.tool_calls]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"})
    assert deltas[-1].finish_reason is FinishReason.STOP  # as OpenAI reports a forced call


async def test_tools_without_a_tool_parser_are_refused_unless_tool_choice_is_none(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine()
    with pytest.raises(EngineRequestError) as refused:
        await engine.render_chat(HI, TOOLS)
    assert refused.value.param == "tools"
    prompt = await engine.render_chat(
        HI, ChatContext(tools=(WEATHER,), tool_choice=ToolChoice(ToolChoiceMode.NONE))
    )
    assert "get_weather" in prompt.text


async def test_a_tool_loop_history_renders_with_arguments_as_objects(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine(tool_call_parser="hermes")
    history = [
        ChatMessage(role="user", content="Weather?"),
        ChatMessage(
            role="assistant",
            content="",
            tool_calls=(ToolCall(id="c1", name="get_weather", arguments='{"city": "Rome"}'),),
        ),
        ChatMessage(role="tool", content="sunny", tool_call_id="c1"),
    ]
    prompt = await engine.render_chat(history, TOOLS)
    assert (
        '<tool_call> {"name": "get_weather", "arguments": {"city": "Rome"}} </tool_call>'
        in prompt.text
    )
    assert "<|tool|> sunny <|end|>" in prompt.text


async def test_an_unknown_parser_name_stops_the_start(fake_vllm: ModuleType) -> None:
    engine = VllmEngine(
        MODEL, VllmEngineConfig(model="m", tool_call_parser="nope"), context_length=64
    )
    with pytest.raises(EngineUnavailableError, match="nope"):
        await engine.start()


# -- reasoning ----------------------------------------------------------------------------------


async def test_vllms_reasoning_parser_splits_thinking_from_the_answer(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine(reasoning_parser="qwen3")
    assert fake_llm(fake_vllm).vllm_config.model_config is not None
    prompt = await engine.render_chat(HI, ChatContext(reasoning_effort="high"))
    assert "<|enable_thinking=True|>" in prompt.text and "<|reasoning_effort=high|>" in prompt.text
    fake_llm(fake_vllm).script = ["<think>", "hmm", "right", "</think>", "Hello"]
    deltas = await run(engine, prompt)
    assert "".join(d.reasoning for d in deltas).split() == ["hmm", "right"]
    assert text_of(deltas).split() == ["Hello"]
    assert sum(d.reasoning_tokens for d in deltas) == 2
    assert sum(d.num_tokens for d in deltas) == 6


async def test_hidden_reasoning_is_still_counted(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine(reasoning_parser="qwen3")
    prompt = await engine.render_chat(HI, ChatContext(include_reasoning=False))
    fake_llm(fake_vllm).script = ["<think>", "secret", "</think>", "Hi"]
    deltas = await run(engine, prompt, logprobs=1)
    assert "".join(d.reasoning for d in deltas) == ""
    assert sum(d.reasoning_tokens for d in deltas) == 1
    assert all(d.logprobs == () for d in deltas)  # they would show the hidden tokens


# -- structured output, logprobs, n, sampling extras -----------------------------------------------


async def test_a_json_schema_reaches_vllms_structured_outputs(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    response_format = ResponseFormat(type=ResponseFormatType.JSON_SCHEMA, schema=schema, name="x")
    await run(engine, await engine.render_chat(HI), response_format=response_format)
    await run(
        engine,
        await engine.render_chat(HI),
        response_format=ResponseFormat(type=ResponseFormatType.JSON_OBJECT),
    )
    first, second = fake_llm(fake_vllm).sent_params
    assert first.structured_outputs.json == schema
    assert second.structured_outputs.json_object is True


async def test_logprobs_are_vllms_sorted_by_rank(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine()
    deltas = await run(engine, await engine.render_chat(HI), logprobs=3)
    entries = [e for d in deltas for e in d.logprobs]
    assert len(entries) == sum(d.num_tokens for d in deltas) == 6
    for entry in entries:
        assert entry.logprob == -0.25
        assert [c.logprob for c in entry.top] == [-0.25, -2.0, -3.0]
        assert entry.top[0].token_id == entry.token_id
    assert fake_llm(fake_vllm).sent_params[0].logprobs == 3


async def test_n_choices_come_with_their_index_and_one_final_prompt_count(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine()
    prompt = await engine.render_chat(HI)
    deltas = await run(engine, prompt, n=3, seed=7, temperature=0.9)
    assert {d.index for d in deltas} == {0, 1, 2}
    assert [d.prompt_tokens for d in deltas if d.prompt_tokens is not None] == [prompt.num_tokens]
    assert deltas[-1].is_last
    for index in range(3):
        mine = [d for d in deltas if d.index == index]
        assert sum(d.num_tokens for d in mine) == 6
        assert [d.finish_reason for d in mine if d.finish_reason] == [FinishReason.STOP]
    assert fake_llm(fake_vllm).sent_params[0].n == 3


async def test_sampling_extras_reach_vllm(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine()
    llm = fake_llm(fake_vllm)
    bravo = llm.get_tokenizer().encode("bravo", add_special_tokens=False)[0]
    prompt = await engine.render_chat(HI)
    forced = await run(engine, prompt, logit_bias={bravo: 100.0}, ignore_eos=True, max_tokens=3)
    stopped = await run(engine, prompt, logit_bias={bravo: 100.0}, stop_token_ids=(bravo,))
    await run(engine, prompt, top_k=5, min_p=0.2, repetition_penalty=1.3)
    assert text_of(forced).split() == ["bravo"] * 3
    assert (text_of(stopped), stopped[-1].stop_reason) == ("", bravo)
    assert sum(d.num_tokens for d in stopped) == 1
    extras = llm.sent_params[-1]
    assert (extras.top_k, extras.min_p, extras.repetition_penalty) == (5, 0.2, 1.3)


async def test_token_ids_outside_the_vocabulary_are_refused_before_vllm(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine()
    vocab = fake_vllm.VOCAB_SIZE
    assert engine.vocab_size == vocab
    prompt = await engine.render_chat(HI)
    for options, param in (
        ({"logit_bias": {vocab: 1.0}}, "logit_bias"),
        ({"stop_token_ids": (vocab,)}, "stop_token_ids"),
        ({"logprobs": 21}, "top_logprobs"),
    ):
        with pytest.raises(EngineRequestError) as refused:
            await run(engine, prompt, **options)
        assert refused.value.param == param
    with pytest.raises(EngineRequestError) as refused:
        await engine.render_completion([vocab])
    assert refused.value.param == "prompt"
    assert fake_llm(fake_vllm).sent_params == []


async def test_prompt_logprobs_are_asked_of_the_engine_not_of_vllms_streaming_request(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    # vLLM's request objects refuse prompt_logprobs > 0 with stream=True (its OpenAI server
    # cannot stream them), and the adapter streams DELTA outputs: they go on the params.
    engine = await make_engine()
    chat = await engine.render_chat(HI, ChatContext())
    for prompt in (chat, await engine.render_completion("once upon a time")):
        deltas = await run(engine, prompt, max_tokens=3, prompt_logprobs=2)
        first = deltas[0].prompt_logprobs
        assert first is not None and len(first) == deltas[-1].prompt_tokens
        assert fake_llm(fake_vllm).sent_params[-1].prompt_logprobs == 2


# -- completions --------------------------------------------------------------------------------


async def test_a_completions_prompt_has_no_template_and_can_ask_for_prompt_logprobs(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine()
    text = await engine.render_completion("once upon a time")
    assert (text.text, text.num_tokens, text.chat) == ("once upon a time", 5, None)  # BOS added
    ids = await engine.render_completion(list(text.token_ids or ())[1:])
    assert ids.text == "once upon a time"
    deltas = await run(engine, text, prompt_logprobs=0, logprobs=0)
    first = deltas[0].prompt_logprobs
    assert first is not None and len(first) == 5
    assert first[0].logprob is None and all(e.logprob == -0.5 for e in first[1:])
    assert all(len(e.top) == 0 for d in deltas for e in d.logprobs)
    assert deltas[-1].prompt_tokens == 5
