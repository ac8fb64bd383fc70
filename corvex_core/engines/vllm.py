"""The vLLM backend: the engine seam over one `vllm.v1.engine.async_llm.AsyncLLM` on this node.

It owns building the engine from `VllmEngineConfig` on the GPUs assigned to it, rendering chat
with the model's own template, streaming DELTA outputs with the engine's own token counts,
aborting, embedding and health. It is the only module of the project that imports vllm, and it
does so lazily, so the rest of the core (its type checks, its tests) runs where vllm is absent.
It must never price, limit or authorise anything: it reports what the engine counted and the
core decides what that costs.

Written against vLLM 0.33.0, read from its wheel: v1/engine/async_llm.py, outputs.py,
sampling_params.py, pooling_params.py, inputs/, engine/arg_utils.py, v1/engine/exceptions.py,
exceptions.py, renderers/ and entrypoints/launchers/grpc_server.py (how vLLM's own gRPC server
builds its AsyncLLM). Every vLLM name it uses is listed in vllm_contract.py, which `make
vllm-check` checks against an installed vLLM.
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
    ChatMessage,
    Delta,
    Embeddings,
    EmbedInput,
    EngineError,
    EngineRequestError,
    EngineState,
    EngineStats,
    EngineUnavailableError,
    FinishReason,
    Prompt,
    SamplingOptions,
)
from corvex_core.engines.vllm_contract import (
    OPENAI_SAMPLING_DEFAULTS,
    VLLM_OBJECTS,
    resolve,
    version_warning,
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
    SamplingParams: Any
    RequestOutputKind: Any
    PoolingParams: Any
    TokensPrompt: Any
    TextPrompt: Any
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


def sampling_kwargs(options: SamplingOptions, model_defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of vLLM's SamplingParams, without `output_kind`.

    A value the request set wins, then the model's generation config, then OpenAI's default.
    """
    requested = {
        "temperature": options.temperature,
        "top_p": options.top_p,
        "presence_penalty": options.presence_penalty,
        "frequency_penalty": options.frequency_penalty,
    }
    kwargs: dict[str, Any] = {}
    for name, fallback in OPENAI_SAMPLING_DEFAULTS.items():
        value = requested.get(name)
        kwargs[name] = value if value is not None else model_defaults.get(name, fallback)
    kwargs.update(
        seed=options.seed,
        stop=list(options.stop),
        ignore_eos=options.ignore_eos,
        max_tokens=options.max_tokens,
        skip_special_tokens=model_defaults.get("skip_special_tokens", True),
    )
    return kwargs


def pooling_kwargs(dimensions: int | None) -> dict[str, Any]:
    """Keyword arguments of vLLM's PoolingParams for an embedding.

    `use_activation` is what normalises an embedding in vLLM; it applies after the cut to
    `dimensions`, so the vectors are unit length at the size asked for.
    """
    return {"task": "embed", "dimensions": dimensions, "use_activation": True}


_FINISH_REASONS: Final = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.ABORT,
    # The model stopped on a repetition it was asked to detect. This module never asks
    # (SamplingParams.repetition_detection), but the output is a normal end if it happens.
    "repetition": FinishReason.STOP,
}


def _finish_reason(reason: str | None) -> FinishReason:
    finish = _FINISH_REASONS.get(str(reason))
    if finish is None:
        # vLLM's "error" is an internal failure of this one request (e.g. a KV transfer); its
        # own server answers it with a 500, and so does the core for a bare EngineError.
        raise EngineError(f"vLLM ended the request with finish reason {reason!r}")
    return finish


def _delta(output: Any) -> Delta:
    """One DELTA RequestOutput (possibly several engine steps merged by vLLM) as a Delta."""
    completion = output.outputs[0]
    text, num_tokens = str(completion.text), len(completion.token_ids)
    if not output.finished:
        return Delta(text=text, num_tokens=num_tokens)
    return Delta(
        text=text,
        num_tokens=num_tokens,
        finish_reason=_finish_reason(completion.finish_reason),
        prompt_tokens=len(output.prompt_token_ids or ()),
        cached_prompt_tokens=int(output.num_cached_tokens or 0),
    )


def _message_dict(message: ChatMessage) -> dict[str, str]:
    rendered = {"role": message.role, "content": message.content}
    if message.name is not None:
        rendered["name"] = message.name
    return rendered


def _render_chat(
    tokenizer: Any, conversation: list[dict[str, str]], template_kwargs: Mapping[str, Any]
) -> tuple[str, list[int]]:
    try:
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True, **template_kwargs
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

    async def render_chat(self, messages: Sequence[ChatMessage]) -> Prompt:
        built = self._require_ready()
        conversation = [_message_dict(message) for message in messages]
        kwargs = self._config.chat_template_kwargs
        text, token_ids = await self._off_loop(
            lambda: _render_chat(built.tokenizer, conversation, kwargs)
        )
        return Prompt(text=text, num_tokens=len(token_ids), token_ids=tuple(token_ids))

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
        self._claim(request_id)
        try:
            stream = await self._new_stream(built, request_id, prompt, options)
            try:
                last: Delta | None = None
                with self._translated_errors(built, "messages"):
                    async for output in stream:
                        self._in_flight[request_id] = True
                        delta = _delta(output)
                        if delta.finish_reason is None:
                            yield delta
                        else:
                            last = delta  # vLLM's stream ends right after its last output
                if last is None:
                    raise EngineError(f"vLLM ended a stream of {self._model_id} unfinished")
                # Yielded after vLLM's stream has ended, so that a consumer that stops reading
                # at the last delta leaves nothing in vLLM to abort.
                yield last
            finally:
                await self._close(built, stream)
        finally:
            del self._in_flight[request_id]

    async def _new_stream(
        self, built: _Built, request_id: str, prompt: Prompt, options: SamplingOptions
    ) -> Any:
        token_ids = await self._prompt_token_ids(built, prompt)
        with self._translated_errors(built, "messages"):
            params = built.api.SamplingParams(
                **sampling_kwargs(options, built.sampling_defaults),
                output_kind=built.api.RequestOutputKind.DELTA,
            )
        return built.llm.generate(
            prompt=built.api.TokensPrompt(prompt_token_ids=token_ids),
            sampling_params=params,
            request_id=request_id,
        )

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
