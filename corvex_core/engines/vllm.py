"""The vLLM backend: the engine seam over one `vllm.v1.engine.async_llm.AsyncLLM` on this node.

It owns building the engine from `VllmEngineConfig` on the GPUs assigned to it, rendering chat
with the model's own template (tools included), streaming DELTA outputs with the engine's own
token counts, aborting, embedding and health. A request runs as `vllm serve` runs it: vLLM's own
request object and `to_sampling_params` (structured outputs, logprobs, n, sampling extras), the
model's configured tool-call and reasoning parsers (vLLM's ParserManager, never a parser of
ours) and vLLM's per-choice ChatStreamProcessor; the translations are in vllm_requests.py. It is
the only module of the project that imports vllm, and it does so lazily, so the rest of the core
(its type checks, its tests) runs where vllm is absent.
It must never price, limit or authorise anything: it reports what the engine counted and the
core decides what that costs.

Written against vLLM 0.33.0, read from its wheel: v1/engine/async_llm.py, outputs.py,
sampling_params.py, pooling_params.py, inputs/, engine/arg_utils.py, v1/engine/exceptions.py,
exceptions.py, renderers/, entrypoints/launchers/grpc_server.py (how vLLM's own gRPC server
builds its AsyncLLM), entrypoints/openai/chat_completion/ (protocol.py, serving.py,
stream_processor.py), entrypoints/openai/completion/, renderers/online_renderer.py (when it
calls adjust_request), parser/, tool_parsers/ and reasoning/. Every vLLM name it uses is listed
in vllm_contract.py, which `make vllm-check` checks against an installed vLLM.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import logging
import os
import threading
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from corvex_core.config import VllmEngineConfig
from corvex_core.engines.base import (
    ChatContext,
    ChatMessage,
    Delta,
    Embeddings,
    EmbedInput,
    EngineError,
    EngineRequestError,
    EngineState,
    EngineStats,
    EngineUnavailableError,
    Prompt,
    SamplingOptions,
    TokenLogprob,
    ToolCallDelta,
    ToolChoiceMode,
)
from corvex_core.engines.request_checks import check_chat_context, check_options, check_token_ids
from corvex_core.engines.vllm_contract import VLLM_OBJECTS, resolve, version_warning
from corvex_core.engines.vllm_requests import (
    chat_request_fields,
    completion_request_fields,
    finish_reason,
    message_dict,
    sampling_params,
    template_kwargs,
    template_message,
    token_logprobs,
    tool_call_deltas,
    tool_dict,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# The names this module uses, and the check of them against an installed vLLM, are in
# vllm_contract.py; start-up compares only the version.


@dataclass(frozen=True)
class _VllmApi:
    """The vLLM objects of VLLM_OBJECTS, imported when the first engine starts."""

    AsyncEngineArgs: Any
    AsyncLLM: Any
    UsageContext: Any
    PoolingParams: Any
    TokensPrompt: Any
    TextPrompt: Any
    ChatCompletionRequest: Any
    CompletionRequest: Any
    ParserManager: Any
    ChatStreamProcessor: Any
    EngineDeadError: Any
    EngineGenerateError: Any
    VLLMValidationError: Any
    VLLMClientError: Any
    GenerationError: Any
    RetryableRequestError: Any
    GracefulHTTPError: Any


def _import_vllm() -> _VllmApi:
    # Imported here rather than at the top so that this module loads where vllm is absent;
    # importing vllm also imports torch, which takes seconds, so it runs off the event loop.
    try:
        vllm = importlib.import_module("vllm")
    except ImportError as exc:
        raise ImportError(f"vllm is not installed ({exc}): pip install 'corvex[vllm]'") from exc
    warning = version_warning(str(getattr(vllm, "__version__", "unknown")))
    if warning is not None:
        log.warning("%s", warning)
    return _VllmApi(**{name: resolve(target) for name, target in VLLM_OBJECTS.items()})


# ---------------------------------------------------------------------------------------------
# Pure mappings from Corvex types to vLLM arguments (no vllm import needed).

_RUNNERS: Final = {"generate": "generate", "embed": "pooling"}


def bounded_max_model_len(configured: int | None, context_length: int) -> int:
    """The engine's context: the configured one, never beyond what the rate card sells."""
    if context_length < 1:
        raise ValueError(f"context_length must be positive, not {context_length}")
    return context_length if configured is None else min(configured, context_length)


def engine_args_kwargs(
    model_id: str, config: VllmEngineConfig, *, context_length: int
) -> dict[str, Any]:
    """Keyword arguments of vLLM's AsyncEngineArgs for one model.

    Unset (None) fields are left out so that vLLM's own defaults apply. `engine_args` passes any
    other AsyncEngineArgs field through, but may not repeat a field that has its own setting.
    """
    named: dict[str, Any] = {
        "model": config.model,
        # vLLM's logs and metrics then name the model by its catalogue id.
        "served_model_name": model_id,
        "tokenizer": config.tokenizer,
        "dtype": config.dtype,
        "quantization": config.quantization,
        "max_model_len": bounded_max_model_len(config.max_model_len, context_length),
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "tensor_parallel_size": config.tensor_parallel_size,
        "pipeline_parallel_size": config.pipeline_parallel_size,
        "distributed_executor_backend": config.distributed_executor_backend,
        "enable_prefix_caching": config.enable_prefix_caching,
        "max_num_seqs": config.max_num_seqs,
        "runner": _RUNNERS[config.runner],
        "reasoning_parser": config.reasoning_parser,
    }
    repeated = sorted(named.keys() & config.engine_args.keys())
    if repeated:
        raise ValueError(
            f"engine_args of {model_id} repeat {', '.join(repeated)}: set them with their own "
            "fields of the model's engine config"
        )
    return {name: value for name, value in named.items() if value is not None} | dict(
        config.engine_args
    )


def pooling_kwargs(dimensions: int | None) -> dict[str, Any]:
    """Keyword arguments of vLLM's PoolingParams for an embedding.

    `use_activation` is what normalises an embedding in vLLM; it applies after the cut to
    `dimensions`, so the vectors are unit length at the size asked for.
    """
    return {"task": "embed", "dimensions": dimensions, "use_activation": True}


def _render_chat(
    tokenizer: Any,
    conversation: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    template_kwargs: Mapping[str, Any],
) -> tuple[str, list[int]]:
    try:
        text = tokenizer.apply_chat_template(
            conversation, tools=tools, tokenize=False, add_generation_prompt=True, **template_kwargs
        )
    except Exception as exc:
        # Chat templates reject conversations they cannot render by raising (role order, an
        # unknown role); vLLM's own server answers those with a 400 as well (renderers/hf.py).
        raise EngineRequestError(
            f"the model's chat template rejected the messages: {exc}", param="messages"
        ) from exc
    # The rendered text already holds the template's special tokens (BOS, role markers), so
    # they are not added again, as in vLLM's own chat path (default_chat_tok_params).
    return str(text), list(tokenizer.encode(str(text), add_special_tokens=False))


@dataclass(frozen=True)
class _ChatState:
    """What render_chat keeps in Prompt.engine_data for generate: the conversation as vLLM's
    request takes it, and the template variables the prompt was rendered with."""

    messages: list[dict[str, Any]]
    template_kwargs: dict[str, Any]


class _Job:
    """One request as vLLM's OpenAI server would run it: its vLLM request object and sampling
    params, and per choice vLLM's own stream processor (its tool and reasoning parsers) turning
    each output into the seam's Deltas."""

    def __init__(
        self,
        built: _Built,
        options: SamplingOptions,
        token_ids: list[int],
        params: Any,
        chat_request: Any = None,
        reasoning_ended: bool | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self._built = built
        self._options = options
        self.token_ids = token_ids
        self.params = params
        self.reasoning_ended = reasoning_ended
        self._chat_request = chat_request
        self._template_kwargs = dict(template_kwargs or {})
        self._processors: dict[int, Any] = {}
        self._generated: dict[int, list[int]] = {}
        self._reasoning_tokens: dict[int, int] = {}
        self._prompt_logprobs_sent = False

    @classmethod
    def build(
        cls, built: _Built, prompt: Prompt, options: SamplingOptions, token_ids: list[int]
    ) -> _Job:
        api = built.api
        defaults = built.sampling_defaults
        if prompt.chat is None:
            completion = api.CompletionRequest(**completion_request_fields(token_ids, options))
            params = sampling_params(completion, options, defaults)
            return cls(built, options, token_ids, params)
        state = prompt.engine_data if isinstance(prompt.engine_data, _ChatState) else None
        messages = state.messages if state is not None else []
        kwargs = state.template_kwargs if state is not None else {}
        request = api.ChatCompletionRequest(**chat_request_fields(messages, prompt.chat, options))
        parser = None
        parser_cls = built.parser_cls
        if parser_cls is not None and (
            parser_cls.always_adjust_request
            or parser_cls.reasoning_parser_cls is not None
            or request.tool_choice != "none"
        ):
            # As vLLM's renderer does: the parser may constrain the output (a required or named
            # tool choice becomes structured output) and change sampling (special tokens).
            parser = cls._parser(built, request, kwargs)
            parser.set_prompt_token_ids(token_ids)
            request = parser.adjust_request(request=request)
        params = sampling_params(request, options, defaults)
        ended = request.resolve_reasoning_ended(parser=parser, prompt_token_ids=token_ids)
        return cls(built, options, token_ids, params, request, ended, kwargs)

    @staticmethod
    def _parser(built: _Built, request: Any, template_kwargs: Mapping[str, Any]) -> Any:
        return built.parser_cls(
            built.tokenizer,
            request.tools,
            model_config=built.llm.model_config,
            chat_template_kwargs=dict(template_kwargs),
        )

    def _processor(self, index: int) -> Any:
        """vLLM's per-choice stream processor, with a parser of its own (parsers keep state)."""
        processor = self._processors.get(index)
        if processor is None:
            built = self._built
            parser = None
            if built.parser_cls is not None:
                parser = self._parser(built, self._chat_request, self._template_kwargs)
            processor = self._processors[index] = built.api.ChatStreamProcessor(
                self._chat_request,
                parser,
                enable_auto_tools=self._built_auto_tools(),
                parser_cls=built.parser_cls,
            )
        return processor

    def _built_auto_tools(self) -> bool:
        parser_cls = self._built.parser_cls
        return parser_cls is not None and parser_cls.tool_parser_cls is not None

    def deltas(self, output: Any) -> list[Delta]:
        """One DELTA RequestOutput (possibly several steps, several choices) as Deltas."""
        deltas = [self._delta(completion) for completion in output.outputs]
        if not deltas:
            return deltas
        if not self._prompt_logprobs_sent and self._options.prompt_logprobs is not None:
            self._prompt_logprobs_sent = True
            deltas[0].prompt_logprobs = token_logprobs(
                output.prompt_token_ids or (),
                output.prompt_logprobs or (),
                self._options.prompt_logprobs,
                self._decode,
            )
        if output.finished:
            deltas[-1].prompt_tokens = len(output.prompt_token_ids or ())
            deltas[-1].cached_prompt_tokens = int(output.num_cached_tokens or 0)
        return deltas

    def _delta(self, completion: Any) -> Delta:
        index = int(completion.index)
        new_ids = list(completion.token_ids)
        engine_finish = completion.finish_reason
        if engine_finish is not None and finish_reason(engine_finish) is None:
            # vLLM's "error" is an internal failure of this one request (e.g. a KV transfer); its
            # own server answers it with a 500, and so does the core for a bare EngineError.
            raise EngineError(f"vLLM ended the request with finish reason {engine_finish!r}")
        text, reasoning, finish = str(completion.text), "", engine_finish
        tool_calls: tuple[ToolCallDelta, ...] = ()
        reasoning_tokens, hide_logprobs = 0, False
        if self._chat_request is not None:
            processor = self._processor(index)
            step = processor.step(
                delta_text=text,
                delta_token_ids=new_ids,
                finish_reason=engine_finish,
                prompt_token_ids=self.token_ids,
            )
            message, finish = step.delta, step.finish_reason
            text = (message.content or "") if message is not None else ""
            reasoning = (message.reasoning or "") if message is not None else ""
            tool_calls = tool_call_deltas(message.tool_calls if message is not None else None)
            reasoning_tokens = self._count_reasoning(processor, index, new_ids)
            hide_logprobs = bool(processor.hide_metadata)
        logprobs: tuple[TokenLogprob, ...] = ()
        k = self._options.logprobs
        if k is not None and completion.logprobs is not None and not hide_logprobs:
            logprobs = token_logprobs(new_ids, completion.logprobs, k, self._decode)
        return Delta(
            text=text,
            num_tokens=len(new_ids),
            finish_reason=None if finish is None else finish_reason(finish),
            index=index,
            reasoning=reasoning,
            reasoning_tokens=reasoning_tokens,
            tool_calls=tool_calls,
            logprobs=logprobs,
            stop_reason=completion.stop_reason,
        )

    def _count_reasoning(self, processor: Any, index: int, new_ids: list[int]) -> int:
        """Reasoning tokens among the new ones: vLLM's count over the whole choice, less the
        count so far (as its chat server computes usage.completion_tokens_details)."""
        parser = processor.parser
        generated = self._generated.setdefault(index, [])
        generated.extend(new_ids)
        if parser is None:
            return 0
        total = int(parser.count_reasoning_tokens(generated))
        before = self._reasoning_tokens.get(index, 0)
        self._reasoning_tokens[index] = total
        return max(total - before, 0)

    def _decode(self, token: int) -> str:
        return str(self._built.tokenizer.decode([token]))


# Parameter names vLLM gives its validation errors that mean the prompt itself.
_PROMPT_PARAMETERS: Final = frozenset({"prompt", "input_text", "input_tokens", "prompt_token_ids"})

# How long a client should wait before retrying a request that vLLM's queue refused.
_RETRY_AFTER_S: Final = 1.0
_STARTING_RETRY_AFTER_S: Final = 10.0


# ---------------------------------------------------------------------------------------------
# Building the engine.

# os.environ is one per process, so engines are built one at a time while theirs is set.
_BUILD_LOCK = threading.Lock()


@contextlib.contextmanager
def _engine_environment(devices: list[int] | None) -> Iterator[None]:
    """Sets what vLLM's spawned processes inherit, only while one engine is being built."""
    overrides = {
        # vLLM forks its engine process by default. Forking a process that already runs gRPC
        # threads can deadlock the child, so spawn unless the operator chose otherwise.
        "VLLM_WORKER_MULTIPROC_METHOD": os.environ.get("VLLM_WORKER_MULTIPROC_METHOD", "spawn"),
    }
    if devices is not None:
        overrides["CUDA_VISIBLE_DEVICES"] = ",".join(str(device) for device in devices)
    with _BUILD_LOCK:
        saved = {name: os.environ.get(name) for name in overrides}
        os.environ.update(overrides)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@dataclass(frozen=True)
class _Built:
    """A running AsyncLLM and what is read from it once."""

    api: _VllmApi
    llm: Any
    tokenizer: Any
    sampling_defaults: Mapping[str, Any]
    max_model_len: int
    vocab_size: int
    # vLLM's Parser class for the configured tool-call and reasoning parsers (None: neither).
    parser_cls: Any


def _shut_down_late_build(future: asyncio.Future[_Built]) -> None:
    """Shuts down an engine whose start() was cancelled while it was being built."""
    if not future.cancelled() and future.exception() is None:
        future.result().llm.shutdown()


class VllmEngine:
    """A catalogue model served by vLLM's AsyncLLM on this node's GPUs."""

    def __init__(
        self,
        model_id: str,
        config: VllmEngineConfig,
        *,
        context_length: int,
        llm_factory: Callable[[], Any] | None = None,
    ) -> None:
        """`llm_factory` builds the AsyncLLM instead of vLLM's own constructors (tests)."""
        self._model_id = model_id
        self._config = config
        self._context_length = context_length
        # Computed now so that a bad engine config fails when the core reads it, not at start.
        self._engine_kwargs = engine_args_kwargs(model_id, config, context_length=context_length)
        self._llm_factory = llm_factory
        self._state = EngineState.STARTING
        self._built: _Built | None = None
        # Request id -> whether it produced output yet (running) or not (waiting).
        self._in_flight: dict[str, bool] = {}
        # Templates and tokenizers are CPU work that must not stall the event loop. One thread,
        # because a fast tokenizer is not safe to call from two threads at once.
        self._tokenizer_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"corvex-tokenizer-{model_id}"
        )

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def kind(self) -> str:
        return "vllm"

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def supports_embeddings(self) -> bool:
        return self._config.runner == "embed"

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._built is not None:
            return
        if self._state is EngineState.STOPPED:
            raise EngineUnavailableError(f"the engine for {self._model_id} was shut down")
        self._state = EngineState.STARTING
        # Loading weights takes minutes: build on a worker thread so the core keeps answering
        # (health says NOT_SERVING meanwhile). AsyncLLM supports being built off the loop; it
        # starts its output handler on the first request.
        build = asyncio.get_running_loop().run_in_executor(None, self._build)
        try:
            built = await asyncio.shield(build)
        except asyncio.CancelledError:
            build.add_done_callback(_shut_down_late_build)
            raise
        except Exception as exc:
            if self._state is EngineState.STARTING:
                self._state = EngineState.DEAD
            log.error("vLLM engine for model %s failed to start: %s", self._model_id, exc)
            raise EngineUnavailableError(
                f"the vLLM engine for {self._model_id} could not start: {exc}"
            ) from exc
        if self._state is EngineState.STOPPED:  # shut down while it was loading
            await asyncio.to_thread(built.llm.shutdown)
            raise EngineUnavailableError(f"the engine for {self._model_id} was shut down")
        self._built = built
        self._state = EngineState.READY
        log.info("vLLM engine for model %s is ready", self._model_id)

    def _build(self) -> _Built:
        api = _import_vllm()
        with _engine_environment(self._config.devices):
            llm = self._llm_factory() if self._llm_factory is not None else self._new_llm(api)
        try:
            built = _Built(
                api=api,
                llm=llm,
                tokenizer=llm.get_tokenizer(),
                sampling_defaults=dict(llm.model_config.get_diff_sampling_param()),
                max_model_len=int(llm.model_config.max_model_len),
                vocab_size=int(llm.model_config.get_vocab_size()),
                parser_cls=self._parser_cls(api, llm.get_tokenizer()),
            )
        except BaseException:
            llm.shutdown()
            raise
        if built.max_model_len < self._context_length:
            log.warning(
                "vLLM fits %d tokens of context for %s, less than the rate card's %d: longer "
                "requests will be refused",
                built.max_model_len,
                self._model_id,
                self._context_length,
            )
        return built

    def _parser_cls(self, api: _VllmApi, tokenizer: Any) -> Any:
        """vLLM's own parsers for this model, as `vllm serve --tool-call-parser ...
        --enable-auto-tool-choice --reasoning-parser ...` picks them; an unknown name stops the
        start."""
        config = self._config
        return api.ParserManager.get_parser(
            tool_parser_name=config.tool_call_parser,
            reasoning_parser_name=config.reasoning_parser,
            enable_auto_tools=config.tool_call_parser is not None,
            model_name=config.model,
            tokenizer=tokenizer,
        )

    def _new_llm(self, api: _VllmApi) -> Any:
        args = api.AsyncEngineArgs(**self._engine_kwargs)
        # The same calls as vLLM's own gRPC server (entrypoints/launchers/grpc_server.py).
        usage = api.UsageContext.OPENAI_API_SERVER
        vllm_config = args.create_engine_config(usage_context=usage)
        return api.AsyncLLM.from_vllm_config(
            vllm_config=vllm_config,
            usage_context=usage,
            enable_log_requests=args.enable_log_requests,
            disable_log_stats=args.disable_log_stats,
        )

    async def shutdown(self) -> None:
        if self._state is EngineState.STOPPED:
            return
        self._state = EngineState.STOPPED
        built, self._built = self._built, None
        if built is not None:
            if self._in_flight:
                # Their consumers then get a final "abort" output rather than waiting forever
                # on an engine that is gone.
                with contextlib.suppress(built.api.EngineDeadError):
                    await built.llm.abort(request_id=list(self._in_flight))
            # AsyncLLM.shutdown is synchronous: it joins the engine processes.
            await asyncio.to_thread(built.llm.shutdown)
        self._tokenizer_pool.shutdown(wait=False)
        log.info("vLLM engine for model %s is shut down", self._model_id)

    async def check_health(self) -> None:
        built = self._require_ready()
        try:
            await built.llm.check_health()
        except built.api.EngineDeadError as exc:
            self._mark_dead(exc)
            raise EngineUnavailableError(f"the engine serving {self._model_id} died") from exc

    def stats(self) -> EngineStats:
        # What this adapter can see: a request is running once vLLM has produced its first
        # output, waiting (queued or in prefill) before that.
        running = sum(self._in_flight.values())
        return EngineStats(running=running, waiting=len(self._in_flight) - running)

    def _require_ready(self) -> _Built:
        if self._state is EngineState.READY and self._built is not None:
            return self._built
        if self._state is EngineState.STARTING:
            raise EngineUnavailableError(
                f"{self._model_id} is still loading", retry_after_s=_STARTING_RETRY_AFTER_S
            )
        raise EngineUnavailableError(f"the engine serving {self._model_id} is {self._state.value}")

    def _mark_dead(self, exc: BaseException) -> None:
        if self._state is not EngineState.READY:
            return
        self._state = EngineState.DEAD
        log.error("vLLM engine for model %s died: %r", self._model_id, exc)

    # -- tokens --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._require_ready().vocab_size

    async def render_chat(
        self, messages: Sequence[ChatMessage], context: ChatContext | None = None
    ) -> Prompt:
        built = self._require_ready()
        context = context if context is not None else ChatContext()
        check_chat_context(context)
        self._check_tool_parsing(built, context)
        conversation = [template_message(m) for m in messages]
        tools = [tool_dict(t) for t in context.tools] or None
        with self._translated_errors(built, "messages"):
            kwargs = self._template_kwargs(built, context)
        text, token_ids = await self._off_loop(
            lambda: _render_chat(built.tokenizer, conversation, tools, kwargs)
        )
        state = _ChatState(messages=[message_dict(m) for m in messages], template_kwargs=kwargs)
        return Prompt(
            text=text,
            num_tokens=len(token_ids),
            token_ids=tuple(token_ids),
            chat=context,
            engine_data=state,
        )

    async def render_completion(self, prompt: str | Sequence[int]) -> Prompt:
        built = self._require_ready()
        if isinstance(prompt, str):
            # vLLM's completions tokenize a text prompt with the model's special tokens (BOS).
            text = prompt
            ids = await self._off_loop(lambda: list(built.tokenizer.encode(text)))
        else:
            ids = list(prompt)
            check_token_ids(ids, built.vocab_size, "prompt")
            text = await self._off_loop(lambda: str(built.tokenizer.decode(ids)))
        return Prompt(text=text, num_tokens=len(ids), token_ids=tuple(ids))

    def _check_tool_parsing(self, built: _Built, context: ChatContext) -> None:
        """Tools the model may call need vLLM's tool parser for it, as `vllm serve` requires."""
        if not context.tools or context.tool_choice.mode is ToolChoiceMode.NONE:
            return
        if built.parser_cls is None or built.parser_cls.tool_parser_cls is None:
            raise EngineRequestError(
                f"{self._model_id} is not configured to call tools (no tool_call_parser); "
                'send tool_choice "none" or no tools.',
                param="tools",
            )

    def _template_kwargs(self, built: _Built, context: ChatContext) -> dict[str, Any]:
        """The template variables vLLM's chat server would use: the request's (with
        reasoning_effort and its enable_thinking) over the model's configured ones."""
        request = built.api.ChatCompletionRequest(
            messages=[],
            reasoning_effort=context.reasoning_effort,
            chat_template_kwargs=dict(context.template_kwargs) or None,
        )
        params = request.build_chat_params(
            default_template=None, default_template_content_format="auto"
        ).with_defaults(dict(self._config.chat_template_kwargs))
        return template_kwargs(params.chat_template_kwargs)

    async def count_tokens(self, text: str) -> int:
        built = self._require_ready()
        return await self._off_loop(
            lambda: len(built.tokenizer.encode(text, add_special_tokens=False))
        )

    def _off_loop(self, work: Callable[[], T]) -> Awaitable[T]:
        return asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, work)

    # -- requests --------------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt: Prompt, options: SamplingOptions
    ) -> AsyncGenerator[Delta, None]:
        built = self._require_ready()
        if self._config.runner == "embed":
            raise EngineRequestError(f"{self._model_id} is an embedding model", param="model")
        check_options(options, built.vocab_size)
        self._claim(request_id)
        try:
            job = await self._new_job(built, prompt, options)
            stream = built.llm.generate(
                prompt=built.api.TokensPrompt(prompt_token_ids=job.token_ids),
                sampling_params=job.params,
                request_id=request_id,
                reasoning_ended=job.reasoning_ended,
            )
            try:
                last: list[Delta] | None = None
                with self._translated_errors(built, "messages"):
                    async for output in stream:
                        self._in_flight[request_id] = True
                        deltas = job.deltas(output)
                        if not output.finished:
                            for delta in deltas:
                                yield delta
                        else:
                            last = deltas  # vLLM's stream ends right after its last output
                if not last:
                    raise EngineError(f"vLLM ended a stream of {self._model_id} unfinished")
                # Yielded after vLLM's stream has ended, so that a consumer that stops reading
                # at the last delta leaves nothing in vLLM to abort.
                for delta in last:
                    yield delta
            finally:
                await self._close(built, stream)
        finally:
            del self._in_flight[request_id]

    async def _new_job(self, built: _Built, prompt: Prompt, options: SamplingOptions) -> _Job:
        token_ids = await self._prompt_token_ids(built, prompt)
        with self._translated_errors(built, "messages"):
            return await self._off_loop(lambda: _Job.build(built, prompt, options, token_ids))

    async def abort(self, request_id: str) -> None:
        built = self._built
        if built is None or request_id not in self._in_flight:
            return
        try:
            await built.llm.abort(request_id=request_id)
        except built.api.EngineDeadError as exc:
            # A dead engine holds no requests: there is nothing left to abort.
            self._mark_dead(exc)

    async def embed(self, inputs: Sequence[EmbedInput], dimensions: int | None) -> Embeddings:
        built = self._require_ready()
        if not self.supports_embeddings:
            raise EngineRequestError(f"{self._model_id} cannot embed", param="model")
        with self._translated_errors(built, "input"):
            params = built.api.PoolingParams(**pooling_kwargs(dimensions))
        batch_id = f"embd-{uuid.uuid4().hex}"
        results = await _all_or_none(
            [
                self._embed_one(built, f"{batch_id}-{i}", item, params)
                for i, item in enumerate(inputs)
            ]
        )
        return Embeddings(
            vectors=[vector for vector, _ in results],
            prompt_tokens=sum(tokens for _, tokens in results),
        )

    async def _embed_one(
        self, built: _Built, request_id: str, item: EmbedInput, params: Any
    ) -> tuple[list[float], int]:
        if item.token_ids is not None:
            prompt = built.api.TokensPrompt(prompt_token_ids=list(item.token_ids))
        elif item.text is not None:
            prompt = built.api.TextPrompt(prompt=item.text)
        else:
            raise EngineRequestError("an input has neither text nor token ids", param="input")
        self._claim(request_id)
        final: Any = None
        stream = built.llm.encode(prompt=prompt, pooling_params=params, request_id=request_id)
        try:
            with self._translated_errors(built, "input"):
                async for output in stream:
                    self._in_flight[request_id] = True
                    final = output
                if final is not None and final.error is not None:
                    raise final.error.to_exception()
        finally:
            del self._in_flight[request_id]
            await self._close(built, stream)
        if final is None:
            raise EngineError(f"vLLM returned no embedding for {self._model_id}")
        return [float(x) for x in final.outputs.data.tolist()], len(final.prompt_token_ids)

    def _claim(self, request_id: str) -> None:
        if request_id in self._in_flight:
            raise EngineRequestError(f"request id {request_id} is already running")
        self._in_flight[request_id] = False

    async def _prompt_token_ids(self, built: _Built, prompt: Prompt) -> list[int]:
        if prompt.token_ids is not None:
            return list(prompt.token_ids)
        # A prompt this engine did not render: its text is a rendered template already.
        return await self._off_loop(
            lambda: list(built.tokenizer.encode(prompt.text, add_special_tokens=False))
        )

    async def _close(self, built: _Built, stream: Any) -> None:
        """Closes a vLLM stream, which aborts its request if it is still running."""
        try:
            await stream.aclose()
        except built.api.EngineDeadError as exc:
            self._mark_dead(exc)

    @contextlib.contextmanager
    def _translated_errors(self, built: _Built, prompt_param: str) -> Iterator[None]:
        """Turns vLLM's exceptions into the seam's, marking the engine dead when vLLM says so."""
        api = built.api
        try:
            yield
        except api.EngineDeadError as exc:
            self._mark_dead(exc)
            raise EngineUnavailableError(f"the engine serving {self._model_id} died") from exc
        except api.VLLMValidationError as exc:
            param = exc.parameter
            raise EngineRequestError(
                str(exc), param=prompt_param if param in _PROMPT_PARAMETERS else param
            ) from exc
        except (api.VLLMClientError, ValueError) as exc:
            raise EngineRequestError(str(exc)) from exc
        except api.RetryableRequestError as exc:
            raise EngineUnavailableError(str(exc), retry_after_s=_RETRY_AFTER_S) from exc
        except api.GracefulHTTPError as exc:
            raise _graceful_error(exc) from exc
        except (api.GenerationError, api.EngineGenerateError) as exc:
            raise EngineError(f"vLLM failed a request for {self._model_id}: {exc!r}") from exc


def _graceful_error(exc: Any) -> EngineError:
    """vLLM's errors that carry their own HTTP status (its admission control)."""
    status = int(exc.http_status)
    if status == 503:
        return EngineUnavailableError(str(exc), retry_after_s=_RETRY_AFTER_S)
    if 400 <= status < 500:
        return EngineRequestError(str(exc))
    return EngineError(str(exc))


async def _all_or_none(work: Sequence[Awaitable[T]]) -> list[T]:
    """Awaits all together; when one fails, cancels (and so aborts) the rest before raising."""
    tasks = [asyncio.ensure_future(item) for item in work]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
