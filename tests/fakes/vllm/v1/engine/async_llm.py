"""vllm/v1/engine/async_llm.py: AsyncLLM's public calls and their semantics, over the toy model
of vllm._fake instead of an EngineCore process on GPUs.

Kept from vLLM: the signatures; add_request's validation and errors; one RequestOutputCollector
per request, so DELTA outputs merge when the consumer is slower than the engine; generate() and
encode() aborting their request when the consumer closes or cancels them; abort() ending a
request with a final "abort" output; max_tokens and EOS checked by the engine and stop strings
by the detokenizer (their text withheld); prefix-cache hits reported as num_cached_tokens; a
dead engine raising EngineDeadError to every caller.
Also kept: parallel sampling (n children of one request, child i seeded with seed + i, the
outputs of each carrying its index, the request finished when all are); logprobs of each
sampled token with its top candidates, prompt logprobs on the first output; stop token ids;
logit_bias (+100 forces a token, -100 bans one); SamplingParams.verify against the model.
Fake-only (no such thing in vLLM): hold(), resume(), step(), kill() and the attributes tests
watch (environ, aborted, answer_tokens, script, sent_params, is_shut_down).
"""

import asyncio
import os
import random
import secrets
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vllm import _fake
from vllm.config import VllmConfig
from vllm.exceptions import GenerationError, GracefulHTTPError, VLLMClientError, VLLMValidationError
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, PoolingOutput, PoolingRequestOutput, RequestOutput
from vllm.pooling_params import PoolingParams
from vllm.sampling_params import SamplingParams
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError
from vllm.v1.engine.output_processor import RequestOutputCollector


@dataclass
class _Parent:
    """ParentRequest: the n children of one request and whether its prompt logprobs went out."""

    unfinished: int
    prompt_logprobs_sent: bool = False


@dataclass
class _Request:
    """A request as the engine core holds it (one child of a parallel-sampling request)."""

    request_id: str
    external_req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams | PoolingParams
    queue: RequestOutputCollector
    num_cached_tokens: int
    rng: random.Random
    output_token_ids: list[int] = field(default_factory=list)
    # Detokenized output so far (cut at a stop string) and how much of it was sent.
    text: str = ""
    sent: int = 0
    index: int = 0
    parent: _Parent = field(default_factory=lambda: _Parent(unfinished=1))


class AsyncLLM:
    """An asynchronous wrapper for the vLLM engine."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        executor_class: type[Any],
        log_stats: bool,
        usage_context: UsageContext = UsageContext.ENGINE_CONTEXT,
        mm_registry: Any = None,
        log_requests: bool = True,
        start_engine_loop: bool = True,
        stat_loggers: list[Any] | None = None,
        aggregate_engine_logging: bool = False,
        client_addresses: dict[str, Any] | None = None,
        client_count: int = 1,
        client_index: int = 0,
        profiler: Any = None,
    ) -> None:
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.log_requests = log_requests
        self.log_stats = log_stats
        self.usage_context = usage_context
        self._tokenizer = _fake.FakeTokenizer()
        self._requests: dict[str, _Request] = {}
        self._external_req_ids: dict[str, list[str]] = {}
        self._cached_prefixes: set[tuple[int, ...]] = set()
        self._dead = False
        self._engine_loop: asyncio.Task[None] | None = None
        self._has_work = asyncio.Event()
        # Fake-only. What the engine processes vLLM spawns here would inherit:
        self.environ = {
            name: os.environ.get(name)
            for name in ("CUDA_VISIBLE_DEVICES", "VLLM_WORKER_MULTIPROC_METHOD")
        }
        # Whether the engine steps by itself (False: only when a test calls step()).
        self.auto_step = True
        # Words the toy model answers before it emits EOS.
        self.answer_tokens = 5
        # Words the toy model says instead (then EOS), e.g. markup a parser should find.
        self.script: list[str] | None = None
        # The SamplingParams of every request added, in order.
        self.sent_params: list[SamplingParams | PoolingParams] = []
        # External ids of the requests abort() ended, in order.
        self.aborted: list[str] = []
        self.is_shut_down = False
        _fake.ENGINES.append(self)

    @classmethod
    def from_vllm_config(
        cls,
        vllm_config: VllmConfig,
        start_engine_loop: bool = True,
        usage_context: UsageContext = UsageContext.ENGINE_CONTEXT,
        stat_loggers: list[Any] | None = None,
        enable_log_requests: bool = False,
        aggregate_engine_logging: bool = False,
        disable_log_stats: bool = False,
        client_addresses: dict[str, Any] | None = None,
        client_count: int = 1,
        client_index: int = 0,
    ) -> "AsyncLLM":
        return cls(
            vllm_config=vllm_config,
            executor_class=object,
            start_engine_loop=start_engine_loop,
            stat_loggers=stat_loggers,
            log_requests=enable_log_requests,
            log_stats=not disable_log_stats,
            aggregate_engine_logging=aggregate_engine_logging,
            usage_context=usage_context,
            client_addresses=client_addresses,
            client_count=client_count,
            client_index=client_index,
        )

    def shutdown(self, timeout: float | None = None) -> None:
        """Shutdown. Like vLLM, it leaves requests still in the engine unfinished."""
        self.is_shut_down = True
        self._dead = True
        task = self._engine_loop
        if task is not None:
            # vLLM cancels its output handler thread-safely: shutdown() may run off the loop.
            task.get_loop().call_soon_threadsafe(task.cancel)

    # -- state ---------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> _fake.FakeTokenizer:
        return self._tokenizer

    def get_tokenizer(self) -> _fake.FakeTokenizer:
        return self._tokenizer

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    @property
    def errored(self) -> bool:
        return self._dead

    @property
    def dead_error(self) -> BaseException:
        return EngineDeadError()

    async def check_health(self) -> None:
        if self.errored:
            raise self.dead_error

    # -- requests ------------------------------------------------------------------------------

    async def add_request(
        self,
        request_id: str,
        prompt: Any,
        params: SamplingParams | PoolingParams,
        arrival_time: float | None = None,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        trace_headers: Mapping[str, str] | None = None,
        priority: int = 0,
        data_parallel_rank: int | None = None,
        session_id: str | None = None,
        prompt_text: str | None = None,
        reasoning_ended: bool | None = None,
        reasoning_parser_kwargs: dict[str, Any] | None = None,
        kv_hints: Any = None,
    ) -> RequestOutputCollector:
        """Add new request to the AsyncLLM."""
        if self.errored:
            raise EngineDeadError()
        token_ids = self._prompt_token_ids(prompt)
        params = self._validated(params, token_ids)
        self.sent_params.append(params)
        # vLLM makes the id unique (InputProcessor.assign_request_id); abort() takes either.
        internal_id = f"{request_id}-{secrets.token_hex(4)}"
        queue = RequestOutputCollector(params.output_kind, internal_id)
        n = getattr(params, "n", 1)
        parent = _Parent(unfinished=n)
        cached = self._cache_hits(token_ids)
        for index in range(n):
            child_params = params
            child_id = internal_id
            if n > 1:
                # ParentRequest.get_child_info: its own id, n=1, and seed + index.
                child_params = params.clone()
                child_params.n = 1
                if child_params.seed is not None:
                    child_params.seed += index
                child_id = f"{index}_{internal_id}"
            self._requests[child_id] = _Request(
                request_id=child_id,
                external_req_id=request_id,
                prompt_token_ids=token_ids,
                params=child_params,
                queue=queue,
                num_cached_tokens=cached,
                rng=_fake.sampler(
                    getattr(child_params, "seed", None),
                    getattr(child_params, "temperature", 1.0),
                    token_ids,
                ),
                index=index,
                parent=parent,
            )
            self._external_req_ids.setdefault(request_id, []).append(child_id)
        self._run_engine_loop()
        return queue

    async def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        prompt_text: str | None = None,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        trace_headers: Mapping[str, str] | None = None,
        priority: int = 0,
        data_parallel_rank: int | None = None,
        session_id: str | None = None,
        kv_hints: Any = None,
        reasoning_ended: bool | None = None,
        reasoning_parser_kwargs: dict[str, Any] | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        q: RequestOutputCollector | None = None
        try:
            q = await self.add_request(request_id, prompt, sampling_params)
            finished = False
            while not finished:
                out = q.get_nowait() or await q.get()
                assert isinstance(out, RequestOutput)
                finished = out.finished
                yield out
        # The consumer went away (cancelled, or closed the generator): abort the request.
        except (asyncio.CancelledError, GeneratorExit):
            if q is not None:
                await self.abort(q.request_id, internal=True)
            raise
        # Engine is dead. Do not abort since we shut down.
        except EngineDeadError:
            raise
        except (VLLMClientError, GracefulHTTPError, GenerationError):
            if q is not None:
                await self.abort(q.request_id, internal=True)
            raise
        except Exception as e:
            if q is not None:
                await self.abort(q.request_id, internal=True)
            raise EngineGenerateError() from e
        finally:
            if q is not None:
                q.close()

    async def encode(
        self,
        prompt: Any,
        pooling_params: PoolingParams,
        request_id: str,
        lora_request: Any = None,
        trace_headers: Mapping[str, str] | None = None,
        priority: int = 0,
        tokenization_kwargs: dict[str, Any] | None = None,
        reasoning_ended: bool | None = None,
    ) -> AsyncGenerator[PoolingRequestOutput, None]:
        q: RequestOutputCollector | None = None
        try:
            q = await self.add_request(request_id, prompt, pooling_params)
            finished = False
            while not finished:
                out = q.get_nowait() or await q.get()
                assert isinstance(out, PoolingRequestOutput)
                finished = out.finished
                yield out
        except asyncio.CancelledError:
            if q is not None:
                await self.abort(q.request_id, internal=True)
            raise
        except EngineDeadError:
            raise
        except (VLLMClientError, GracefulHTTPError, GenerationError):
            raise
        except Exception as e:
            if q is not None:
                await self.abort(q.request_id, internal=True)
            raise EngineGenerateError() from e
        finally:
            if q is not None:
                q.close()

    async def abort(self, request_id: str | Iterable[str], internal: bool = False) -> None:
        """Abort RequestId in OutputProcessor and EngineCore."""
        request_ids = (request_id,) if isinstance(request_id, str) else list(request_id)
        for rid in request_ids:
            # An internal id stands for its parallel-sampling children ("{index}_{id}") too.
            internal_ids = (
                [i for i in self._requests if i == rid or i.endswith(f"_{rid}")]
                if internal
                else self._external_req_ids.pop(rid, [])
            )
            for internal_id in internal_ids:
                request = self._requests.pop(internal_id, None)
                if request is not None:
                    self._forget(request)
                    self.aborted.append(request.external_req_id)
                    request.queue.put(self._final_abort_output(request))
        # The engine core is told next; a dead one cannot be.
        if self._dead:
            raise EngineDeadError()

    # -- fake-only controls ------------------------------------------------------------------

    def hold(self) -> None:
        """Stops the engine stepping by itself; step() then advances it."""
        self.auto_step = False
        self._has_work.clear()

    def resume(self) -> None:
        self.auto_step = True
        self._wake()

    def kill(self) -> None:
        """The engine core process dies: every waiting stream gets EngineDeadError."""
        self._dead = True
        for request in self._requests.values():
            request.queue.put(EngineDeadError())
        self._requests.clear()
        self._external_req_ids.clear()

    def step(self) -> None:
        """One engine iteration: every request gets one token (a pooling request its result)."""
        for request in list(self._requests.values()):
            if isinstance(request.params, PoolingParams):
                output: RequestOutput | PoolingRequestOutput = self._pool(request)
                finished = True
            else:
                output = self._decode(request, request.params)
                finished = output.finished
            if finished:
                del self._requests[request.request_id]
                self._forget(request)
            request.queue.put(output)

    # -- the toy engine ----------------------------------------------------------------------

    def _run_engine_loop(self) -> None:
        if self._engine_loop is None:
            self._engine_loop = asyncio.get_running_loop().create_task(self._engine_steps())
        self._wake()

    def _wake(self) -> None:
        if self.auto_step and self._requests and not self._dead:
            self._has_work.set()
        else:
            self._has_work.clear()

    async def _engine_steps(self) -> None:
        while True:
            await self._has_work.wait()
            self.step()
            self._wake()
            # Let the consumers run between steps, as the engine core's process would.
            await asyncio.sleep(0)

    def _prompt_token_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        if "prompt_token_ids" in prompt:
            token_ids = list(prompt["prompt_token_ids"])
        else:
            # Text is tokenized with the completion defaults, special tokens added.
            token_ids = self._tokenizer.encode(prompt["prompt"])
        for bad in (t for t in token_ids if not 0 <= t < _fake.VOCAB_SIZE):
            raise VLLMValidationError(f"Token id {bad} is out of vocabulary")
        max_model_len = self.model_config.max_model_len
        if not token_ids:
            raise VLLMValidationError("The decoder prompt cannot be empty")
        if len(token_ids) > max_model_len:
            raise VLLMValidationError(
                f"The decoder prompt (length {len(token_ids)}) is longer than the maximum model "
                f"length of {max_model_len}. Make sure that `max_model_len` is no smaller than "
                "the number of text tokens."
            )
        if len(token_ids) == max_model_len and self.model_config.runner_type == "generate":
            raise VLLMValidationError(
                f"The decoder prompt (length {len(token_ids)}) plus the number of requested "
                f"output tokens (at least 1) is longer than the maximum model length of "
                f"{max_model_len}."
            )
        return token_ids

    def _validated(
        self, params: SamplingParams | PoolingParams, token_ids: list[int]
    ) -> SamplingParams | PoolingParams:
        runner = self.model_config.runner_type
        if isinstance(params, SamplingParams):
            if runner != "generate":
                raise VLLMValidationError("This model does not support generation")
            params = params.clone()
            if params.max_tokens is None:
                params.max_tokens = self.model_config.max_model_len - len(token_ids)
            params.verify(self.model_config)
            return params
        if runner != "pooling":
            raise VLLMValidationError("This model does not support pooling")
        params = params.clone()
        params.verify(self.model_config)
        return params

    def _cache_hits(self, token_ids: list[int]) -> int:
        """Prompt tokens found in the prefix cache, in whole blocks; the last token is always
        computed again."""
        if not self.vllm_config.cache_config.enable_prefix_caching:
            return 0
        block = self.vllm_config.cache_config.block_size
        hits = 0
        for end in range(block, len(token_ids), block):
            if tuple(token_ids[:end]) not in self._cached_prefixes:
                break
            hits = end
        for end in range(block, len(token_ids) + 1, block):
            self._cached_prefixes.add(tuple(token_ids[:end]))
        return hits

    def _next_token(self, request: _Request, params: SamplingParams) -> int:
        produced = len(request.output_token_ids)
        if self.script is not None:
            if produced >= len(self.script):
                return self._tokenizer.eos_token_id
            return self._tokenizer.encode(self.script[produced], add_special_tokens=False)[0]
        if produced >= self.answer_tokens and not params.ignore_eos:
            return self._tokenizer.eos_token_id
        bias = params.logit_bias or {}
        forced = [t for t, b in bias.items() if b >= 100]
        if forced:
            return min(forced)
        words = [
            w
            for w in _fake.WORDS
            if bias.get(self._tokenizer.encode(w, add_special_tokens=False)[0], 0) > -100
        ]
        return self._tokenizer.encode(request.rng.choice(words), add_special_tokens=False)[0]

    def _word_id(self, word: str) -> int:
        return self._tokenizer.encode(word, add_special_tokens=False)[0]

    def _logprobs(self, request: _Request, token_id: int, k: int) -> dict[int, Logprob]:
        """The sampled token first, then the top k (vLLM's order): the toy model is sure of its
        token (rank 1) and spreads the rest over the first words."""
        decode = self._tokenizer.piece
        position: dict[int, Logprob] = {
            token_id: Logprob(logprob=-0.25, rank=1, decoded_token=decode(token_id, False))
        }
        others = [self._word_id(w) for w in _fake.WORDS]
        for rank, other in enumerate((t for t in others if t != token_id), start=2):
            if len(position) >= max(k, 1):
                break
            position[other] = Logprob(
                logprob=-1.0 * rank, rank=rank, decoded_token=decode(other, False)
            )
        return position

    def _decode(self, request: _Request, params: SamplingParams) -> RequestOutput:
        token_id = self._next_token(request, params)
        request.output_token_ids.append(token_id)
        # EngineCore's check_stop: the length cap first, then EOS.
        finish_reason: str | None = None
        stop_reason: str | int | None = None
        total = len(request.prompt_token_ids) + len(request.output_token_ids)
        assert params.max_tokens is not None
        if (
            len(request.output_token_ids) >= params.max_tokens
            or total >= self.model_config.max_model_len
        ):
            finish_reason = "length"
        elif token_id == self._tokenizer.eos_token_id and not params.ignore_eos:
            finish_reason = "stop"
        elif token_id in (params.stop_token_ids or ()):
            finish_reason, stop_reason = "stop", token_id
        # The detokenizer: a stop string ends the request and its text is not returned; nor is
        # a stop token's, unless include_stop_str_in_output.
        piece = self._tokenizer.piece(token_id, params.skip_special_tokens)
        if stop_reason == token_id and not params.include_stop_str_in_output:
            piece = ""
        text = request.text + piece
        assert isinstance(params.stop, list)
        hits = [(i, s) for s in params.stop if (i := text.find(s)) != -1]
        if hits:
            index, stop_reason = min(hits)
            text, finish_reason = text[:index], "stop"
        request.text = text
        # In DELTA mode, text that may still turn into a stop string is held back.
        held = 0 if finish_reason else params.output_text_buffer_length
        end = max(request.sent, len(text) - held)
        delta, request.sent = text[request.sent : end], end
        logprobs = None
        if params.logprobs is not None:
            logprobs = [self._logprobs(request, token_id, params.logprobs)]
        completion = CompletionOutput(
            index=request.index,
            text=delta,
            token_ids=[token_id],
            cumulative_logprob=None,
            logprobs=logprobs,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
        )
        if finish_reason is not None:
            request.parent.unfinished -= 1
        return self._request_output(request, [completion], finished=request.parent.unfinished == 0)

    def _pool(self, request: _Request) -> PoolingRequestOutput:
        params = request.params
        assert isinstance(params, PoolingParams)
        vector = _fake.embedding(
            request.prompt_token_ids, params.dimensions, bool(params.use_activation)
        )
        return PoolingRequestOutput(
            request_id=request.external_req_id,
            outputs=PoolingOutput(data=_fake.FakeTensor(vector)),
            prompt_token_ids=request.prompt_token_ids,
            num_cached_tokens=request.num_cached_tokens,
            finished=True,
        )

    def _final_abort_output(self, request: _Request) -> RequestOutput | PoolingRequestOutput:
        if isinstance(request.params, PoolingParams):
            return PoolingRequestOutput(
                request_id=request.external_req_id,
                outputs=PoolingOutput(data=_fake.FakeTensor([])),
                prompt_token_ids=request.prompt_token_ids,
                num_cached_tokens=request.num_cached_tokens,
                finished=True,
            )
        completion = CompletionOutput(
            index=request.index,
            text="",
            token_ids=[],
            cumulative_logprob=None,
            logprobs=None,
            finish_reason="abort",
        )
        request.parent.unfinished -= 1
        return self._request_output(request, [completion], finished=request.parent.unfinished == 0)

    def _request_output(
        self, request: _Request, outputs: list[CompletionOutput], *, finished: bool
    ) -> RequestOutput:
        prompt_logprobs = None
        params = request.params
        if (
            getattr(params, "prompt_logprobs", None) is not None
            and not request.parent.prompt_logprobs_sent
        ):
            request.parent.prompt_logprobs_sent = True
            piece = self._tokenizer.piece
            prompt_logprobs = [None] + [
                {t: Logprob(logprob=-0.5, rank=1, decoded_token=piece(t, False))}
                for t in request.prompt_token_ids[1:]
            ]
        return RequestOutput(
            request_id=request.external_req_id,
            prompt=None,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            outputs=outputs,
            finished=finished,
            num_cached_tokens=request.num_cached_tokens,
        )

    def _forget(self, request: _Request) -> None:
        siblings = self._external_req_ids.get(request.external_req_id, [])
        if request.request_id in siblings:
            siblings.remove(request.request_id)
        if not siblings:
            self._external_req_ids.pop(request.external_req_id, None)
