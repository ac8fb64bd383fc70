"""The simulated engine: determinism, bounds, stop strings, timing model, queue, abort."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from corvex_core.config import SimulatedEngineConfig
from corvex_core.engines.base import (
    ChatMessage,
    Delta,
    EmbedInput,
    EngineRequestError,
    EngineUnavailableError,
    FinishReason,
    SamplingOptions,
)
from corvex_core.engines.simulated import SimulatedEngine, count_text_tokens

INSTANT = SimulatedEngineConfig(ttft_ms=0, tpot_ms=0, prefill_ms_per_1k_tokens=0)


@contextlib.asynccontextmanager
async def running(config: SimulatedEngineConfig = INSTANT) -> AsyncIterator[SimulatedEngine]:
    engine = SimulatedEngine("org/model", config)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


async def generate(
    engine: SimulatedEngine, text: str, request_id: str = "r", **options: object
) -> list[Delta]:
    prompt = await engine.render_chat([ChatMessage(role="user", content=text)])
    opts = SamplingOptions(**{"max_tokens": 50, **options})  # type: ignore[arg-type]
    return [d async for d in engine.generate(request_id, prompt, opts)]


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


async def test_greedy_output_depends_only_on_the_prompt() -> None:
    async with running() as engine:
        first = await generate(engine, "hello", temperature=0, seed=1)
        second = await generate(engine, "hello", temperature=0, seed=2)
        other = await generate(engine, "goodbye", temperature=0)
    assert text_of(first) == text_of(second)
    assert text_of(first) != text_of(other)


async def test_seed_makes_sampling_reproducible() -> None:
    async with running() as engine:
        a = await generate(engine, "hi", temperature=1.0, seed=7, ignore_eos=True)
        b = await generate(engine, "hi", temperature=1.0, seed=7, ignore_eos=True)
        c = await generate(engine, "hi", temperature=1.0, seed=8, ignore_eos=True)
    assert text_of(a) == text_of(b) != text_of(c)


async def test_counts_and_finish() -> None:
    async with running() as engine:
        deltas = await generate(engine, "count me", max_tokens=20, ignore_eos=True)
    assert sum(d.num_tokens for d in deltas) == 20
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].prompt_tokens == count_text_tokens("<|user|>\ncount me\n<|assistant|>\n")
    # Every generated token is one token when counted again.
    assert count_text_tokens(text_of(deltas)) == 20


async def test_natural_answers_stop_before_max_tokens() -> None:
    config = SimulatedEngineConfig(
        ttft_ms=0, tpot_ms=0, prefill_ms_per_1k_tokens=0, min_answer_tokens=5, max_answer_tokens=5
    )
    async with running(config) as engine:
        deltas = await generate(engine, "short", max_tokens=50)
    assert sum(d.num_tokens for d in deltas) == 5
    assert deltas[-1].finish_reason is FinishReason.STOP


async def test_stop_string_is_cut_and_never_streamed() -> None:
    async with running() as engine:
        full = text_of(await generate(engine, "stops", temperature=0, ignore_eos=True))
        stop = full.split()[4]
        deltas = await generate(engine, "stops", temperature=0, ignore_eos=True, stop=(stop,))
    assert deltas[-1].finish_reason is FinishReason.STOP
    assert text_of(deltas) == full[: full.index(stop)]
    assert all(stop not in d.text for d in deltas)


async def test_no_token_comes_before_the_timing_model_allows() -> None:
    # Ordering only (a token is never early); how fast it is on time is for the benchmarks.
    config = SimulatedEngineConfig(ttft_ms=100, tpot_ms=10, prefill_ms_per_1k_tokens=0)
    async with running(config) as engine:
        prompt = await engine.render_chat([ChatMessage(role="user", content="t")])
        started = time.monotonic()
        stream = engine.generate("r", prompt, SamplingOptions(max_tokens=10, ignore_eos=True))
        first = await anext(stream)
        first_at = time.monotonic()
        async for _ in stream:
            pass
        last_at = time.monotonic()
    assert first.num_tokens >= 1
    assert first_at - started >= 0.1
    assert last_at - started >= 0.1 + 9 * 0.01


async def test_full_queue_refuses_with_engine_unavailable() -> None:
    config = SimulatedEngineConfig(ttft_ms=0, tpot_ms=50, max_batch=1, max_queue=1)
    async with running(config) as engine:
        prompt = await engine.render_chat([ChatMessage(role="user", content="q")])
        options = SamplingOptions(max_tokens=100, ignore_eos=True)
        running_one = engine.generate("a", prompt, options)
        await anext(running_one)
        waiting = engine.generate("b", prompt, options)
        waiting_task = asyncio.create_task(anext(waiting))
        await asyncio.sleep(0.01)
        assert engine.stats().running == 1 and engine.stats().waiting == 1
        with pytest.raises(EngineUnavailableError) as exc:
            await anext(engine.generate("c", prompt, options))
        assert exc.value.retry_after_s is not None
        await running_one.aclose()
        await waiting_task
        await waiting.aclose()
        assert engine.stats().running == 0 and engine.stats().waiting == 0


async def test_closing_the_stream_aborts_the_request() -> None:
    config = SimulatedEngineConfig(ttft_ms=0, tpot_ms=5)
    async with running(config) as engine:
        prompt = await engine.render_chat([ChatMessage(role="user", content="q")])
        stream = engine.generate("a", prompt, SamplingOptions(max_tokens=1000, ignore_eos=True))
        await anext(stream)
        assert engine.stats().running == 1
        await stream.aclose()
        assert engine.stats().running == 0


async def test_abort_ends_the_stream_with_abort() -> None:
    config = SimulatedEngineConfig(ttft_ms=0, tpot_ms=5)
    async with running(config) as engine:
        prompt = await engine.render_chat([ChatMessage(role="user", content="q")])
        stream = engine.generate("a", prompt, SamplingOptions(max_tokens=1000, ignore_eos=True))
        await anext(stream)
        await engine.abort("a")
        rest = [d async for d in stream]
    assert rest[-1].finish_reason is FinishReason.ABORT
    assert rest[-1].prompt_tokens == prompt.num_tokens


async def test_coalesces_steps_for_a_slow_consumer() -> None:
    config = SimulatedEngineConfig(ttft_ms=0, tpot_ms=1)
    async with running(config) as engine:
        prompt = await engine.render_chat([ChatMessage(role="user", content="q")])
        stream = engine.generate("a", prompt, SamplingOptions(max_tokens=1000, ignore_eos=True))
        await anext(stream)
        await asyncio.sleep(0.05)
        merged = await anext(stream)
        await stream.aclose()
    assert merged.num_tokens > 5
    assert count_text_tokens(merged.text) == merged.num_tokens


async def test_a_message_name_is_part_of_the_prompt() -> None:
    # Accepted, so used: the template writes it, and it is billed as prompt tokens.
    async with running() as engine:
        plain = await engine.render_chat([ChatMessage(role="user", content="x")])
        named = await engine.render_chat([ChatMessage(role="user", content="x", name="bob")])
    assert "name=bob" in named.text and "name=" not in plain.text
    assert named.num_tokens > plain.num_tokens


async def test_embeddings_are_deterministic_unit_vectors() -> None:
    async with running() as engine:
        a = await engine.embed([EmbedInput(text="x y"), EmbedInput(token_ids=(1, 2, 3))], None)
        b = await engine.embed([EmbedInput(text="x y")], 16)
        with pytest.raises(EngineRequestError) as exc:
            await engine.embed([EmbedInput(text="x")], 10**6)
    assert a.prompt_tokens == 5
    assert len(a.vectors[0]) == 1024
    assert sum(v * v for v in a.vectors[0]) == pytest.approx(1.0)
    assert sum(v * v for v in b.vectors[0]) == pytest.approx(1.0)
    assert exc.value.param == "dimensions"


async def test_not_ready_engine_is_unavailable() -> None:
    engine = SimulatedEngine("org/model", INSTANT)
    with pytest.raises(EngineUnavailableError):
        await engine.check_health()
