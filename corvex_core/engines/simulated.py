"""The simulated engine: a deterministic stand-in for a GPU engine on CPU machines.

Text and token counts follow from the prompt and the seed alone, so tests and benchmarks are
reproducible; a timing model (time to first token, time per decode step, slowdown as the batch
grows, a batch limit and a bounded queue) makes load behave like a GPU under load. It must
never pretend to be a real model: every surface that names the engine says "simulated".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import math
import random
import re
import struct
import time
from collections.abc import AsyncGenerator, Sequence

from corvex_core.config import SimulatedEngineConfig
from corvex_core.engines.base import (
    ChatMessage,
    Delta,
    Embeddings,
    EmbedInput,
    EngineRequestError,
    EngineState,
    EngineStats,
    EngineUnavailableError,
    FinishReason,
    Prompt,
    SamplingOptions,
)

log = logging.getLogger(__name__)

# Words, punctuation and symbols each count as one token. Crude, but deterministic and linear.
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_SPACE_RE = re.compile(r"\s")
# Work done between two turns of the event loop, so a long prompt or a large embeddings
# request does not stall every other stream while it is counted or computed (a few ms each).
_TOKENIZE_CHUNK_CHARS = 65_536
_EMBED_CHUNK_INPUTS = 4

# The vocabulary answers are drawn from. Plain words, so every generated token is one token
# when the answer is counted again.
_VOCABULARY = tuple(
    [
        "the",
        "a",
        "of",
        "and",
        "to",
        "in",
        "is",
        "that",
        "it",
        "for",
        "on",
        "with",
        "as",
        "was",
        "by",
        "at",
        "be",
        "this",
        "from",
        "or",
        "an",
        "are",
        "which",
        "model",
        "token",
        "request",
        "engine",
        "answer",
        "batch",
        "latency",
        "stream",
        "prompt",
        "context",
        "output",
        "input",
        "price",
        "credit",
        "balance",
        "metered",
        "gateway",
        "core",
        "journal",
        "ledger",
        "limit",
        "minute",
        "month",
        "cap",
        "reload",
        "invoice",
        "fast",
        "small",
        "large",
        "simple",
        "exact",
        "durable",
        "atomic",
        "steady",
        "bounded",
        "quiet",
        "clear",
        "open",
        "plain",
        "system",
        "user",
        "assistant",
        "message",
        "reason",
        "result",
        "value",
        "number",
        "signal",
        "measure",
        "record",
        "charge",
        "runs",
        "holds",
        "keeps",
        "sends",
        "reads",
        "writes",
        "counts",
        "checks",
        "settles",
        "reserves",
        "returns",
        "serves",
        "waits",
        "when",
        "then",
        "while",
        "after",
        "before",
        "because",
        "so",
        "if",
        "not",
        "only",
        "also",
        "still",
        "even",
        "just",
        "more",
        "less",
    ]
)


def count_text_tokens(text: str) -> int:
    """The simulated tokenizer: words and punctuation marks are one token each."""
    return len(_TOKEN_RE.findall(text))


async def count_text_tokens_yielding(text: str) -> int:
    """`count_text_tokens`, giving the event loop a turn after every chunk of the text.

    Chunks end at whitespace, which no token spans, so the count is the same.
    """
    if len(text) <= _TOKENIZE_CHUNK_CHARS:
        return count_text_tokens(text)
    total, start = 0, 0
    while start < len(text):
        space = _SPACE_RE.search(text, start + _TOKENIZE_CHUNK_CHARS)
        end = space.start() if space else len(text)
        total += count_text_tokens(text[start:end])
        start = end
        await asyncio.sleep(0)
    return total


def render_template(messages: Sequence[ChatMessage]) -> str:
    """A ChatML-like template; real engines use the model's own template instead."""
    parts = [f"<|{m.role}|>\n{m.content}\n" for m in messages]
    parts.append("<|assistant|>\n")
    return "".join(parts)


class _Collector:
    """Buffers a request's output until its consumer takes it, merging steps meanwhile.

    This is what makes streaming cheap under load: a consumer that falls behind receives one
    Delta holding every token produced since it last looked, not one Delta per token.
    """

    __slots__ = ("_event", "_finish", "_parts", "_tokens")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._tokens = 0
        self._finish: FinishReason | None = None
        self._event = asyncio.Event()

    def put(self, text: str, num_tokens: int, finish: FinishReason | None = None) -> None:
        if text:
            self._parts.append(text)
        self._tokens += num_tokens
        if finish is not None:
            self._finish = finish
        self._event.set()

    async def get(self) -> Delta:
        await self._event.wait()
        self._event.clear()
        delta = Delta(
            text="".join(self._parts), num_tokens=self._tokens, finish_reason=self._finish
        )
        self._parts.clear()
        self._tokens = 0
        return delta


class _Request:
    """One request inside the engine: its generator state and its output buffer."""

    __slots__ = (
        "collector",
        "finished",
        "holdback_chars",
        "id",
        "length",
        "options",
        "pending",
        "produced",
        "prompt",
        "ready_at",
        "rng",
    )

    def __init__(self, request_id: str, prompt: Prompt, options: SamplingOptions, length: int):
        self.id = request_id
        self.prompt = prompt
        self.options = options
        self.length = length
        self.rng = random.Random(_request_seed(prompt, options))
        self.collector = _Collector()
        self.produced = 0
        # Text produced but not yet emitted. With stop strings, the last (longest stop - 1)
        # characters are held back until they can no longer begin a stop string, so a stop
        # string never reaches the client, as in vLLM.
        self.pending = ""
        self.holdback_chars = max((len(s) for s in options.stop), default=1) - 1
        self.ready_at = 0.0
        self.finished = False

    def step(self) -> bool:
        """Produces one token. Returns True when the request has finished."""
        word = _VOCABULARY[self.rng.randrange(len(_VOCABULARY))]
        piece = word if self.produced == 0 else " " + word
        self.produced += 1
        done = self.produced >= self.length
        reason = (
            FinishReason.LENGTH if self.produced >= self.options.max_tokens else FinishReason.STOP
        )
        if not self.options.stop:
            self._emit(piece, reason if done else None)
            return done
        self.pending += piece
        for stop in self.options.stop:
            cut = self.pending.find(stop)
            if cut >= 0:
                self._emit(self.pending[:cut], FinishReason.STOP)
                return True
        if done:
            self._emit(self.pending, reason)
            return True
        ready = len(self.pending) - self.holdback_chars
        if ready > 0:
            self._emit(self.pending[:ready], None)
            self.pending = self.pending[ready:]
        else:
            self.collector.put("", 1)
        return False

    def _emit(self, text: str, finish: FinishReason | None) -> None:
        self.collector.put(text, 1, finish)
        if finish is not None:
            self.finished = True


def _request_seed(prompt: Prompt, options: SamplingOptions) -> int:
    """Greedy sampling depends on the prompt only; otherwise on the prompt and the seed."""
    if options.temperature == 0:
        material = prompt.text
    elif options.seed is not None:
        material = f"{options.seed}\x00{prompt.text}"
    else:
        return random.getrandbits(64)
    return int.from_bytes(hashlib.blake2b(material.encode(), digest_size=8).digest(), "big")


class SimulatedEngine:
    """A deterministic engine with a GPU-like timing model, driven by one step loop."""

    kind = "simulated"
    supports_embeddings = True

    def __init__(self, model_id: str, config: SimulatedEngineConfig) -> None:
        if config.max_batch < 1 or config.max_queue < 0:
            raise ValueError("simulated engine needs max_batch >= 1 and max_queue >= 0")
        if not 1 <= config.min_answer_tokens <= config.max_answer_tokens:
            raise ValueError("simulated engine needs 1 <= min_answer_tokens <= max_answer_tokens")
        self._model_id = model_id
        self._config = config
        self._state = EngineState.STARTING
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: dict[str, _Request] = {}
        self._by_id: dict[str, _Request] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def state(self) -> EngineState:
        return self._state

    async def start(self) -> None:
        if self._config.load_ms > 0:
            await asyncio.sleep(self._config.load_ms / 1000)
        self._loop_task = asyncio.create_task(self._run(), name=f"sim-engine:{self._model_id}")
        self._state = EngineState.READY

    async def shutdown(self) -> None:
        if self._state is EngineState.STOPPED:
            return
        self._state = EngineState.STOPPED
        for request in list(self._by_id.values()):
            self._finish_aborted(request)
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    async def check_health(self) -> None:
        if self._state is not EngineState.READY:
            raise EngineUnavailableError(
                f"Model {self._model_id} is {self._state.value}.", retry_after_s=1.0
            )

    async def render_chat(self, messages: Sequence[ChatMessage]) -> Prompt:
        text = render_template(messages)
        return Prompt(text=text, num_tokens=await count_text_tokens_yielding(text))

    async def count_tokens(self, text: str) -> int:
        return await count_text_tokens_yielding(text)

    async def generate(
        self, request_id: str, prompt: Prompt, options: SamplingOptions
    ) -> AsyncGenerator[Delta, None]:
        await self.check_health()
        if len(self._waiting) >= self._config.max_queue:
            raise EngineUnavailableError(
                f"Model {self._model_id} is at capacity ({len(self._waiting)} requests "
                "waiting); retry shortly.",
                retry_after_s=1.0,
            )
        if request_id in self._by_id:
            raise EngineRequestError(f"request id {request_id} is already running")
        request = _Request(request_id, prompt, options, self._answer_length(prompt, options))
        self._by_id[request_id] = request
        self._waiting.append(request)
        self._wake.set()
        try:
            while True:
                delta = await request.collector.get()
                if delta.finish_reason is not None:
                    delta.prompt_tokens = prompt.num_tokens
                    yield delta
                    return
                yield delta
        finally:
            # Reached on normal end, on an abort, and when the consumer closes or is cancelled.
            if not request.finished:
                self._finish_aborted(request)
            self._by_id.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        request = self._by_id.get(request_id)
        if request is not None and not request.finished:
            self._finish_aborted(request)

    async def embed(self, inputs: Sequence[EmbedInput], dimensions: int | None) -> Embeddings:
        await self.check_health()
        full = self._config.embedding_dimensions
        size = full if dimensions is None else dimensions
        if not 1 <= size <= full:
            raise EngineRequestError(
                f"dimensions must be between 1 and {full} for {self._model_id}",
                param="dimensions",
            )
        vectors: list[list[float]] = []
        tokens = 0
        for index, item in enumerate(inputs):
            if index and index % _EMBED_CHUNK_INPUTS == 0:
                await asyncio.sleep(0)
            if item.token_ids is not None:
                material = struct.pack(f"<{len(item.token_ids)}I", *item.token_ids)
                tokens += len(item.token_ids)
            else:
                text = item.text or ""
                material = text.encode()
                tokens += await count_text_tokens_yielding(text)
            vectors.append(self._vector(material, size))
        return Embeddings(vectors=vectors, prompt_tokens=tokens)

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self._running), waiting=len(self._waiting))

    def _answer_length(self, prompt: Prompt, options: SamplingOptions) -> int:
        if options.ignore_eos:
            return options.max_tokens
        digest = hashlib.blake2b(
            f"{self._config.seed}\x00{prompt.text}".encode(), digest_size=4
        ).digest()
        span = self._config.max_answer_tokens - self._config.min_answer_tokens + 1
        natural = self._config.min_answer_tokens + int.from_bytes(digest, "big") % span
        return min(natural, options.max_tokens)

    def _vector(self, material: bytes, size: int) -> list[float]:
        """A unit vector that follows from the input and the seed. Its first `size` components
        are those of the full vector, normalised again, as a model's shortened embeddings are.
        Drawn from a hash (fast, in C) rather than a Python RNG: 2,048 inputs take
        milliseconds, not seconds."""
        digest = hashlib.shake_256(self._config.seed.to_bytes(8, "big") + material).digest(4 * size)
        raw = struct.unpack(f"<{size}i", digest)
        scale = 1.0 / (math.hypot(*raw) or 1.0)
        return [x * scale for x in raw]

    def _finish_aborted(self, request: _Request) -> None:
        if self._running.pop(request.id, None) is None and request in self._waiting:
            self._waiting.remove(request)
        if not request.finished:
            request.finished = True
            request.collector.put("", 0, FinishReason.ABORT)

    async def _run(self) -> None:
        """The step loop: admit waiting requests, sleep one step, advance every running one."""
        config = self._config
        while True:
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = time.monotonic()
            while self._waiting and len(self._running) < config.max_batch:
                request = self._waiting.popleft()
                prefill_ms = config.ttft_ms + config.prefill_ms_per_1k_tokens * (
                    request.prompt.num_tokens / 1000
                )
                request.ready_at = now + prefill_ms / 1000
                self._running[request.id] = request
            step_ms = config.tpot_ms * (1 + config.batch_slowdown * (len(self._running) - 1))
            await asyncio.sleep(step_ms / 1000)
            now = time.monotonic()
            for request in list(self._running.values()):
                if request.ready_at <= now and request.step():
                    del self._running[request.id]
