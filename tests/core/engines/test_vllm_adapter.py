"""The vLLM adapter driven against the fake vllm of tests/fakes (same calls, same outputs).

The fake is on sys.path only inside these tests (the `fake_vllm` fixture), so the real vLLM,
when installed, is what every other test sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from types import ModuleType
from typing import Any

import pytest

from corvex_core.config import VllmEngineConfig
from corvex_core.engines.base import (
    ChatContext,
    ChatMessage,
    Delta,
    EmbedInput,
    Engine,
    EngineRequestError,
    EngineState,
    EngineStats,
    EngineUnavailableError,
    FinishReason,
    Prompt,
    SamplingOptions,
)
from corvex_core.engines.vllm import VllmEngine, engine_args_kwargs
from corvex_core.engines.vllm_contract import (
    CHAT_REQUEST_FIELD_NAMES,
    COMPLETION_REQUEST_FIELD_NAMES,
    ENGINE_ARG_NAMES,
)
from corvex_core.engines.vllm_requests import chat_request_fields, completion_request_fields

MODEL = "acme/chat-1"
HELLO = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")]
TIMEOUT_S = 5.0


EngineFactory = Callable[..., Awaitable[VllmEngine]]


@pytest.fixture
async def make_engine(fake_vllm: ModuleType) -> AsyncIterator[EngineFactory]:
    """Builds and starts adapters over the fake; shuts them all down afterwards."""
    engines: list[VllmEngine] = []

    async def make(
        config: VllmEngineConfig | None = None,
        *,
        context_length: int = 4096,
        start: bool = True,
        **kwargs: Any,
    ) -> VllmEngine:
        engine = VllmEngine(
            MODEL,
            config or VllmEngineConfig(model="/weights/chat-1"),
            context_length=context_length,
            **kwargs,
        )
        engines.append(engine)
        if start:
            await engine.start()
        return engine

    yield make
    for engine in engines:
        await engine.shutdown()


def fake_llm(fake_vllm: ModuleType) -> Any:
    """The fake AsyncLLM that the adapter built last."""
    return fake_vllm.ENGINES[-1]


async def collect(stream: AsyncIterator[Delta]) -> list[Delta]:
    async with asyncio.timeout(TIMEOUT_S):
        return [delta async for delta in stream]


async def until(condition: Callable[[], bool]) -> None:
    """Lets other tasks run until `condition` holds (state that has no event to wait on)."""
    async with asyncio.timeout(TIMEOUT_S):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0)


def options(**kwargs: Any) -> SamplingOptions:
    return SamplingOptions(**{"max_tokens": 64, **kwargs})


def words(text: str) -> list[str]:
    return text.split()


# -- the contract with vLLM --------------------------------------------------------------------


def test_the_contract_lists_match_what_the_adapter_passes() -> None:
    every_option = SamplingOptions(
        max_tokens=5,
        temperature=0.5,
        top_p=0.9,
        stop=("x",),
        seed=1,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        ignore_eos=True,
    )
    context = ChatContext()
    assert set(chat_request_fields([], context, every_option)) == set(CHAT_REQUEST_FIELD_NAMES)
    assert set(completion_request_fields([1], every_option)) == set(COMPLETION_REQUEST_FIELD_NAMES)
    every_field = VllmEngineConfig(
        model="m",
        tokenizer="t",
        quantization="fp8",
        max_model_len=10,
        distributed_executor_backend="ray",
        enable_prefix_caching=True,
        max_num_seqs=8,
        reasoning_parser="qwen3",
    )
    passed = set(engine_args_kwargs("id", every_field, context_length=10))
    # The two log switches are read back from AsyncEngineArgs for from_vllm_config.
    assert passed == set(ENGINE_ARG_NAMES) - {"enable_log_requests", "disable_log_stats"}


# -- building the engine -----------------------------------------------------------------------


async def test_start_builds_the_engine_from_the_config(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    config = VllmEngineConfig(
        model="/weights/chat-1",
        dtype="bfloat16",
        quantization="fp8",
        tensor_parallel_size=2,
        devices=[4, 5],
        gpu_memory_utilization=0.8,
        max_num_seqs=32,
        engine_args={"trust_remote_code": True, "kv_cache_dtype": "fp8"},
    )
    engine = await make_engine(config, context_length=8192)

    llm = fake_llm(fake_vllm)
    vllm_config = llm.vllm_config
    assert engine.state is EngineState.READY
    assert isinstance(engine, Engine)
    assert (engine.kind, engine.model_id, engine.supports_embeddings) == ("vllm", MODEL, False)
    assert vllm_config.model_config.model == "/weights/chat-1"
    assert vllm_config.model_config.served_model_name == MODEL
    assert vllm_config.model_config.max_model_len == 8192
    assert vllm_config.parallel_config.tensor_parallel_size == 2
    assert vllm_config.cache_config.gpu_memory_utilization == 0.8
    assert vllm_config.scheduler_config.max_num_seqs == 32
    assert llm.usage_context.value == "OPENAI_API_SERVER"
    # The engine's processes saw its GPUs and the spawn start method ...
    assert llm.environ == {"CUDA_VISIBLE_DEVICES": "4,5", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    # ... and the core's own environment is as it was.
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert "VLLM_WORKER_MULTIPROC_METHOD" not in os.environ


async def test_max_model_len_never_exceeds_the_rate_cards_context(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    await make_engine(VllmEngineConfig(model="m", max_model_len=100_000), context_length=8192)
    assert fake_llm(fake_vllm).model_config.max_model_len == 8192
    await make_engine(VllmEngineConfig(model="m", max_model_len=2048), context_length=8192)
    assert fake_llm(fake_vllm).model_config.max_model_len == 2048


async def test_an_operator_choice_of_start_method_is_kept(
    make_engine: EngineFactory, fake_vllm: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    await make_engine()
    assert fake_llm(fake_vllm).environ["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"


async def test_an_engine_larger_than_its_devices_does_not_start(
    make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    engine = await make_engine(
        VllmEngineConfig(model="m", tensor_parallel_size=2, devices=[3]), start=False
    )
    with pytest.raises(EngineUnavailableError, match=MODEL):
        await engine.start()
    assert engine.state is EngineState.DEAD
    assert MODEL in caplog.text


async def test_an_unknown_engine_argument_stops_the_start(make_engine: EngineFactory) -> None:
    engine = await make_engine(
        VllmEngineConfig(model="m", engine_args={"no_such_argument": 1}), start=False
    )
    with pytest.raises(EngineUnavailableError, match="no_such_argument"):
        await engine.start()


def test_engine_args_cannot_repeat_a_setting_that_has_its_own_field() -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        VllmEngine(
            MODEL,
            VllmEngineConfig(model="m", engine_args={"max_model_len": 10}),
            context_length=100,
        )


async def test_an_injected_engine_is_built_with_the_devices_set(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    seen: list[str | None] = []

    def factory() -> Any:
        seen.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
        args = importlib.import_module("vllm.engine.arg_utils").AsyncEngineArgs(model="m")
        llm_class = importlib.import_module("vllm.v1.engine.async_llm").AsyncLLM
        return llm_class.from_vllm_config(args.create_engine_config())

    engine = await make_engine(
        VllmEngineConfig(model="m", devices=[7]), llm_factory=factory, context_length=64
    )
    assert seen == ["7"]
    assert engine.state is EngineState.READY


async def test_requests_wait_until_the_engine_has_started(make_engine: EngineFactory) -> None:
    engine = await make_engine(start=False)
    assert engine.state is EngineState.STARTING
    with pytest.raises(EngineUnavailableError) as refused:
        await engine.render_chat(HELLO)
    assert refused.value.retry_after_s is not None


# -- prompts -----------------------------------------------------------------------------------


async def test_chat_is_rendered_with_the_models_template_and_counted_by_its_tokenizer(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine()
    prompt = await engine.render_chat(HELLO)

    assert prompt.text == "<s> <|system|> Be brief. <|end|> <|user|> Hi <|end|> <|assistant|>"
    tokenizer = fake_llm(fake_vllm).get_tokenizer()
    # The template's own BOS is the only one: none is added on top when tokenizing.
    assert list(prompt.token_ids or ()) == tokenizer.encode(prompt.text, add_special_tokens=False)
    assert prompt.num_tokens == len(words(prompt.text)) == 9


async def test_chat_template_kwargs_reach_the_template(make_engine: EngineFactory) -> None:
    engine = await make_engine(
        VllmEngineConfig(model="m", chat_template_kwargs={"enable_thinking": False})
    )
    prompt = await engine.render_chat(HELLO)
    assert prompt.text.startswith("<s> <|enable_thinking=False|> <|system|>")


async def test_a_conversation_the_template_rejects_is_a_request_error(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine()
    with pytest.raises(EngineRequestError) as rejected:
        await engine.render_chat([ChatMessage(role="wizard", content="Hi")])
    assert rejected.value.param == "messages"


async def test_count_tokens_counts_plain_text(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    assert await engine.count_tokens("one two three") == 3


# -- generation --------------------------------------------------------------------------------


async def test_generate_streams_the_answer_with_the_engines_token_counts(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine()
    prompt = await engine.render_chat(HELLO)
    deltas = await collect(engine.generate("r1", prompt, options()))

    *middle, last = deltas
    assert all(d.finish_reason is None and d.prompt_tokens is None for d in middle)
    assert last.finish_reason is FinishReason.STOP
    assert last.prompt_tokens == prompt.num_tokens
    # Five words and the end-of-sequence token, whose text is not shown but is billed.
    assert len(words("".join(d.text for d in deltas))) == 5
    assert sum(d.num_tokens for d in deltas) == 6
    assert engine.stats() == EngineStats(running=0, waiting=0)


async def test_a_consumer_that_stops_at_the_last_delta_leaves_nothing_to_abort(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine()
    llm = fake_llm(fake_vllm)
    abort_calls: list[Any] = []
    abort = llm.abort

    async def spy(request_id: Any, internal: bool = False) -> None:
        abort_calls.append(request_id)
        await abort(request_id, internal)

    llm.abort = spy
    stream = engine.generate("r1", await engine.render_chat(HELLO), options())
    async with contextlib.aclosing(stream):
        async for delta in stream:
            if delta.finish_reason is not None:
                break  # as the core's servicer does
    assert abort_calls == []
    assert engine.stats() == EngineStats(running=0, waiting=0)


async def test_a_slow_consumer_gets_the_steps_it_missed_in_one_delta(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine()
    llm = fake_llm(fake_vllm)
    llm.hold()
    stream = engine.generate("r1", await engine.render_chat(HELLO), options())
    first = asyncio.ensure_future(anext(stream))
    await until(lambda: llm.get_num_unfinished_requests() == 1)

    for _ in range(3):
        llm.step()
    delta = await first

    assert delta.num_tokens == 3
    assert len(words(delta.text)) == 3
    llm.resume()
    rest = await collect(stream)
    assert sum(d.num_tokens for d in [delta, *rest]) == 6


async def test_max_tokens_ends_with_length(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    deltas = await collect(
        engine.generate("r1", await engine.render_chat(HELLO), options(max_tokens=2))
    )
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert sum(d.num_tokens for d in deltas) == 2


async def test_ignore_eos_generates_up_to_max_tokens(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    prompt = await engine.render_chat(HELLO)
    deltas = await collect(engine.generate("r1", prompt, options(max_tokens=9, ignore_eos=True)))
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert sum(d.num_tokens for d in deltas) == 9
    assert len(words("".join(d.text for d in deltas))) == 9


async def test_a_seed_repeats_the_answer_and_a_stop_string_cuts_it(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine()
    prompt = await engine.render_chat(HELLO)
    seeded = options(seed=1234, temperature=0.8)
    first = "".join(d.text for d in await collect(engine.generate("a", prompt, seeded)))
    again = "".join(d.text for d in await collect(engine.generate("b", prompt, seeded)))
    assert first == again

    stop_word = words(first)[2]
    cut = words(first)[: words(first).index(stop_word)]
    stopped = await collect(
        engine.generate("c", prompt, options(seed=1234, temperature=0.8, stop=(stop_word,)))
    )
    assert stopped[-1].finish_reason is FinishReason.STOP
    assert words("".join(d.text for d in stopped)) == cut
    # The token that completed the stop string was generated, so it counts.
    assert sum(d.num_tokens for d in stopped) == len(cut) + 1


async def test_sampling_options_reach_vllm_with_its_defaults_for_the_rest(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine(
        VllmEngineConfig(
            model="m",
            # Stands for the sampling defaults of the model's generation_config.json.
            engine_args={"override_generation_config": {"temperature": 0.6, "top_k": 20}},
        )
    )
    llm = fake_llm(fake_vllm)
    sent: list[Any] = []
    generate = llm.generate

    def spy(prompt: Any, sampling_params: Any, request_id: str, **kwargs: Any) -> Any:
        sent.append(sampling_params)
        return generate(prompt, sampling_params, request_id, **kwargs)

    llm.generate = spy
    prompt = await engine.render_chat(HELLO)
    await collect(engine.generate("a", prompt, options(max_tokens=7)))
    chosen = options(max_tokens=9, temperature=0.2, top_p=0.5, seed=3, stop=("x", "y"))
    await collect(engine.generate("b", prompt, chosen))

    defaults, explicit = sent
    assert (defaults.temperature, defaults.top_k, defaults.top_p) == (0.6, 20, 1.0)
    assert (defaults.presence_penalty, defaults.repetition_penalty) == (0.0, 1.0)
    assert (defaults.max_tokens, defaults.seed, defaults.stop) == (7, None, [])
    assert defaults.output_kind.name == "DELTA"
    assert (explicit.temperature, explicit.top_p, explicit.seed) == (0.2, 0.5, 3)
    assert (explicit.stop, explicit.max_tokens, explicit.ignore_eos) == (["x", "y"], 9, False)


async def test_prompt_tokens_found_in_the_prefix_cache_are_reported(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine()
    long_chat = [ChatMessage(role="user", content=" ".join(["word"] * 40))]
    prompt = await engine.render_chat(long_chat)
    first = await collect(engine.generate("a", prompt, options()))
    second = await collect(engine.generate("b", prompt, options()))
    assert first[-1].cached_prompt_tokens == 0
    assert 0 < second[-1].cached_prompt_tokens < prompt.num_tokens


async def test_a_prompt_without_token_ids_is_tokenized_by_the_engine(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine()
    rendered = await engine.render_chat(HELLO)
    prompt = Prompt(text=rendered.text, num_tokens=rendered.num_tokens)
    deltas = await collect(engine.generate("a", prompt, options()))
    assert deltas[-1].prompt_tokens == rendered.num_tokens


# -- cancellation and abort --------------------------------------------------------------------


async def test_closing_the_stream_mid_answer_aborts_the_request_in_vllm(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine()
    llm = fake_llm(fake_vllm)
    llm.hold()
    stream = engine.generate("r1", await engine.render_chat(HELLO), options())
    first = asyncio.ensure_future(anext(stream))
    await until(lambda: llm.get_num_unfinished_requests() == 1)
    llm.step()
    assert (await first).num_tokens == 1

    await stream.aclose()  # what the core does when its gRPC call is cancelled

    assert llm.aborted == ["r1"]
    assert llm.get_num_unfinished_requests() == 0
    assert engine.stats() == EngineStats(running=0, waiting=0)


async def test_cancelling_the_consumer_aborts_the_request_in_vllm(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine()
    llm = fake_llm(fake_vllm)
    llm.hold()
    prompt = await engine.render_chat(HELLO)
    consumer = asyncio.ensure_future(collect(engine.generate("r1", prompt, options())))
    await until(lambda: llm.get_num_unfinished_requests() == 1)
    assert engine.stats() == EngineStats(running=0, waiting=1)

    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer

    assert llm.aborted == ["r1"]
    assert llm.get_num_unfinished_requests() == 0
    assert engine.stats() == EngineStats(running=0, waiting=0)


async def test_an_explicit_abort_ends_the_stream_with_abort(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine()
    llm = fake_llm(fake_vllm)
    llm.hold()
    prompt = await engine.render_chat(HELLO)
    consumer = asyncio.ensure_future(collect(engine.generate("r1", prompt, options())))
    await until(lambda: llm.get_num_unfinished_requests() == 1)
    llm.step()
    await until(lambda: engine.stats().running == 1)

    await engine.abort("r1")
    await engine.abort("never-seen")  # unknown ids are ignored

    deltas = await consumer
    assert deltas[-1].finish_reason is FinishReason.ABORT
    assert deltas[-1].prompt_tokens == prompt.num_tokens
    assert sum(d.num_tokens for d in deltas) == 1
    assert llm.aborted == ["r1"]


async def test_stats_tell_running_from_waiting(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine()
    llm = fake_llm(fake_vllm)
    llm.hold()
    prompt = await engine.render_chat(HELLO)
    first = asyncio.ensure_future(collect(engine.generate("r1", prompt, options())))
    await until(lambda: llm.get_num_unfinished_requests() == 1)
    llm.step()
    await until(lambda: engine.stats().running == 1)
    second = asyncio.ensure_future(collect(engine.generate("r2", prompt, options())))
    await until(lambda: llm.get_num_unfinished_requests() == 2)

    assert engine.stats() == EngineStats(running=1, waiting=1)
    llm.resume()
    await first
    await second


async def test_a_request_id_cannot_run_twice_at_once(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine()
    llm = fake_llm(fake_vllm)
    llm.hold()
    prompt = await engine.render_chat(HELLO)
    first = asyncio.ensure_future(collect(engine.generate("r1", prompt, options())))
    await until(lambda: llm.get_num_unfinished_requests() == 1)
    with pytest.raises(EngineRequestError):
        await collect(engine.generate("r1", prompt, options()))
    llm.resume()
    await first


# -- failures ----------------------------------------------------------------------------------


async def test_a_dead_engine_fails_its_streams_and_refuses_new_requests(
    make_engine: EngineFactory, fake_vllm: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    engine = await make_engine()
    llm = fake_llm(fake_vllm)
    llm.hold()
    prompt = await engine.render_chat(HELLO)
    stream = engine.generate("r1", prompt, options())
    first = asyncio.ensure_future(anext(stream))
    await until(lambda: llm.get_num_unfinished_requests() == 1)
    llm.step()
    await first

    with caplog.at_level(logging.ERROR, logger="corvex_core.engines.vllm"):
        llm.kill()
        with pytest.raises(EngineUnavailableError):
            await anext(stream)

    assert engine.state is EngineState.DEAD
    assert [r.message for r in caplog.records if MODEL in r.message and "died" in r.message]
    with pytest.raises(EngineUnavailableError):
        await collect(engine.generate("r2", prompt, options()))
    with pytest.raises(EngineUnavailableError):
        await engine.check_health()
    assert engine.stats() == EngineStats(running=0, waiting=0)


async def test_a_health_check_finds_a_dead_engine(
    make_engine: EngineFactory, fake_vllm: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    engine = await make_engine()
    await engine.check_health()
    fake_llm(fake_vllm).kill()
    with pytest.raises(EngineUnavailableError):
        await engine.check_health()
    assert engine.state is EngineState.DEAD
    assert MODEL in caplog.text


async def test_parameters_vllm_rejects_are_request_errors(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    prompt = await engine.render_chat(HELLO)
    with pytest.raises(EngineRequestError) as rejected:
        await collect(engine.generate("r1", prompt, options(temperature=3.5)))
    assert rejected.value.param == "temperature"
    with pytest.raises(EngineRequestError):
        await collect(engine.generate("r2", prompt, options(stop=("",))))
    assert engine.state is EngineState.READY
    assert engine.stats() == EngineStats(running=0, waiting=0)


async def test_a_prompt_longer_than_the_context_is_a_request_error(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine(context_length=16)
    prompt = await engine.render_chat([ChatMessage(role="user", content=" ".join(["w"] * 20))])
    with pytest.raises(EngineRequestError, match="maximum model length"):
        await collect(engine.generate("r1", prompt, options(max_tokens=1)))


async def test_a_full_queue_is_unavailable_with_a_retry_hint(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine()
    llm = fake_llm(fake_vllm)
    queue_full = importlib.import_module("vllm.exceptions").QueueOverflowError

    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise queue_full()

    llm.add_request = refuse
    with pytest.raises(EngineUnavailableError) as refused:
        await collect(engine.generate("r1", await engine.render_chat(HELLO), options()))
    assert refused.value.retry_after_s is not None
    assert engine.state is EngineState.READY


# -- embeddings ---------------------------------------------------------------------------------


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


async def test_an_embedding_model_embeds_texts_and_token_ids(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine(VllmEngineConfig(model="m", runner="embed"))
    assert engine.supports_embeddings
    assert fake_llm(fake_vllm).model_config.runner_type == "pooling"

    inputs = [EmbedInput(text="red green blue"), EmbedInput(token_ids=(7, 8))]
    result = await engine.embed(inputs, dimensions=None)
    assert [len(v) for v in result.vectors] == [fake_vllm.EMBEDDING_SIZE] * 2
    assert all(norm(v) == pytest.approx(1.0) for v in result.vectors)
    # The text is tokenized by vLLM with its special tokens (one BOS here).
    assert result.prompt_tokens == (3 + 1) + 2

    short = await engine.embed(inputs[:1], dimensions=4)
    assert len(short.vectors[0]) == 4
    assert norm(short.vectors[0]) == pytest.approx(1.0)
    assert short.vectors[0] != result.vectors[0][:4]  # normalised after the cut


async def test_dimensions_the_model_cannot_give_are_a_request_error(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine(VllmEngineConfig(model="m", runner="embed"))
    with pytest.raises(EngineRequestError):
        await engine.embed([EmbedInput(text="a")], dimensions=999)
    assert engine.stats() == EngineStats(running=0, waiting=0)


async def test_a_chat_model_cannot_embed_and_an_embedding_model_cannot_chat(
    make_engine: EngineFactory,
) -> None:
    chat = await make_engine()
    with pytest.raises(EngineRequestError) as refused:
        await chat.embed([EmbedInput(text="a")], dimensions=None)
    assert refused.value.param == "model"

    embedder = await make_engine(VllmEngineConfig(model="m", runner="embed"))
    with pytest.raises(EngineRequestError):
        await collect(embedder.generate("r1", await embedder.render_chat(HELLO), options()))


# -- shutdown ----------------------------------------------------------------------------------


async def test_shutdown_ends_running_streams_and_stops_vllm(
    make_engine: EngineFactory, fake_vllm: ModuleType
) -> None:
    engine = await make_engine()
    llm = fake_llm(fake_vllm)
    llm.hold()
    prompt = await engine.render_chat(HELLO)
    consumer = asyncio.ensure_future(collect(engine.generate("r1", prompt, options())))
    await until(lambda: llm.get_num_unfinished_requests() == 1)

    await engine.shutdown()
    await engine.shutdown()  # a second call is harmless

    deltas = await consumer
    assert deltas[-1].finish_reason is FinishReason.ABORT
    assert llm.is_shut_down
    assert engine.state is EngineState.STOPPED
    with pytest.raises(EngineUnavailableError):
        await engine.render_chat(HELLO)
    with pytest.raises(EngineUnavailableError):
        await engine.start()
