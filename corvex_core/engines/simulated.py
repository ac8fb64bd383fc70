"""The simulated engine: a deterministic stand-in for a GPU engine on CPU machines.

Text and token counts follow from the prompt, the options and the seed alone, so tests and
benchmarks are reproducible; a timing model (time to first token, time per decode step,
slowdown as the batch grows, a batch limit and a bounded queue) makes load behave like a GPU
under load. It serves the whole seam: n choices, reasoning, tool calls whose arguments are valid
for the function's schema, JSON valid for a response_format schema, log probabilities, logit
bias over a vocabulary of token ids, stop strings and stop token ids. Every kind of token goes
through the same step loop, one token per choice per step. It must never pretend to be a real
model: every surface that names the engine says "simulated".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import math
import random
import re
import struct
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Final

from corvex_core.config import SimulatedEngineConfig
from corvex_core.engines.base import (
    ChatContext,
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
    ResponseFormatType,
    SamplingOptions,
    TokenLogprob,
    Tool,
    ToolCallDelta,
    ToolChoiceMode,
    TopLogprob,
)
from corvex_core.engines.json_schema import SchemaError, generate_instance
from corvex_core.engines.request_checks import check_chat_context, check_options, check_token_ids

log = logging.getLogger(__name__)

# Words, punctuation and symbols each count as one token. Crude, but deterministic and linear.
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
# The same tokens with the whitespace before them: how a text is cut into generated pieces.
_PIECE_RE = re.compile(r"\s*(?:\w+|[^\w\s])")
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


# Token ids: the answer words first, then punctuation, then every other word by a stable hash
# (the id of "t<N>" is N, so a text made of such tokens names its ids).
_WORD_IDS: Final = {word: i for i, word in enumerate(_VOCABULARY)}
_PUNCTUATION: Final = tuple("!\"#$%&'()*+,-./:;<=>?@[\\]^`{|}~")
_PUNCTUATION_IDS: Final = {mark: len(_VOCABULARY) + i for i, mark in enumerate(_PUNCTUATION)}
_FIRST_OPEN_ID: Final = len(_VOCABULARY) + len(_PUNCTUATION)
_NUMBERED_RE = re.compile(r"t([0-9]{1,9})")
# Most tokens the answer words are drawn from by the step loop.
_WORDS: Final = len(_VOCABULARY)

# Reasoning length (tokens) by OpenAI's reasoning_effort; a thinking switch alone is "medium".
_REASONING_TOKENS: Final = {
    "minimal": 4,
    "low": 8,
    "medium": 16,
    "high": 32,
    "xhigh": 48,
    "max": 64,
}
_THINKING_SWITCHES: Final = ("enable_thinking", "thinking")


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


def text_pieces(text: str) -> list[str]:
    """`text` cut into its tokens, each with the whitespace before it; they join to `text`."""
    pieces = _PIECE_RE.findall(text)
    rest = len(text) - sum(len(p) for p in pieces)
    if rest and pieces:
        pieces[-1] += text[-rest:]
    return pieces


def token_id(piece: str, vocab_size: int) -> int:
    """The id of one token of the simulated vocabulary (whitespace around it ignored)."""
    token = piece.strip()
    known = _WORD_IDS.get(token, _PUNCTUATION_IDS.get(token))
    if known is not None:
        return known
    numbered = _NUMBERED_RE.fullmatch(token)
    if numbered is not None and _FIRST_OPEN_ID <= int(numbered[1]) < vocab_size:
        return int(numbered[1])
    digest = hashlib.blake2b(token.encode(), digest_size=8).digest()
    return _FIRST_OPEN_ID + int.from_bytes(digest, "big") % (vocab_size - _FIRST_OPEN_ID)


def token_text(token: int) -> str:
    """The text of a token id, without the space before it."""
    if token < _WORDS:
        return _VOCABULARY[token]
    if token < _FIRST_OPEN_ID:
        return _PUNCTUATION[token - _WORDS]
    return f"t{token}"


def render_template(messages: Sequence[ChatMessage], context: ChatContext | None = None) -> str:
    """A ChatML-like template; real engines use the model's own template instead.

    Tools are listed in a system block; an assistant's tool calls and a tool's result are shown
    in its message, and a message's `name` in its header, so they count as prompt tokens as
    they would with a real template.
    """
    parts: list[str] = []
    if context is not None and context.tools:
        listed = [
            {"name": t.name, "description": t.description, "parameters": t.parameters}
            for t in context.tools
        ]
        parts.append(f"<|tools|>\n{json.dumps(listed)}\n")
    for m in messages:
        body = m.content
        if m.tool_calls:
            calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in m.tool_calls]
            body = f"{body}\n<|tool_calls|>{json.dumps(calls)}" if body else json.dumps(calls)
        if m.tool_call_id is not None:
            body = f"[{m.tool_call_id}] {body}"
        header = m.role if m.name is None else f"{m.role} name={m.name}"
        parts.append(f"<|{header}|>\n{body}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


def _hash64(*parts: object) -> int:
    material = "\x00".join(str(part) for part in parts).encode()
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big")


def _mix(seed: int, position: int, token: int) -> int:
    """A cheap deterministic hash for per-step choices (logit gaps, logprob values)."""
    x = (seed ^ (position * 0x9E3779B97F4A7C15) ^ (token * 0xC2B2AE3D27D4EB4F)) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return x ^ (x >> 29)


def _unit(seed: int, position: int, token: int = 0) -> float:
    return (_mix(seed, position, token) % 1_000_003) / 1_000_003


def _entry(
    token: int, text: str, probability: float, k: int, seed: int, position: int
) -> TokenLogprob:
    """A token's logprob and the `k` most likely candidates at its position, sorted.

    The candidates other than the token share the probability it leaves, halving each time,
    so with probability > 1/3 the token is the most likely one (as a greedy sample is).
    """
    logprob = math.log(probability)
    if k == 0:
        return TokenLogprob(token_id=token, token=text, logprob=logprob)
    candidates = [TopLogprob(token_id=token, token=text, logprob=logprob)]
    stride = 1 + _mix(seed, position, 7) % (_WORDS - 1)
    other = (token if token < _WORDS else _mix(seed, position, 3) % _WORDS) + stride
    rest = 1.0 - probability
    while len(candidates) < k + 1:
        other %= _WORDS
        if other != token:
            rest /= 2
            candidates.append(
                TopLogprob(token_id=other, token=" " + _VOCABULARY[other], logprob=math.log(rest))
            )
        other += stride
    candidates.sort(key=lambda c: -c.logprob)
    return TokenLogprob(token_id=token, token=text, logprob=logprob, top=tuple(candidates[:k]))


class _Buffer:
    """What one choice produced since its consumer last looked."""

    __slots__ = (
        "finish",
        "logprobs",
        "reasoning",
        "reasoning_tokens",
        "stop_reason",
        "text",
        "tokens",
        "tool_calls",
    )

    def __init__(self) -> None:
        # One buffer is made per choice each time its consumer reads (every token at load), so
        # what most tokens leave empty (reasoning, tool calls, logprobs) is made on first use.
        self.text: list[str] = []
        self.reasoning: list[str] | None = None
        self.tool_calls: list[ToolCallDelta] | None = None
        self.logprobs: list[TokenLogprob] | None = None
        self.tokens = 0
        self.reasoning_tokens = 0
        self.finish: FinishReason | None = None
        self.stop_reason: str | int | None = None

    def add_tool_piece(self, piece: ToolCallDelta) -> None:
        # Argument text of the call already in the buffer joins it, so a slow consumer gets one
        # piece per call (its first piece keeps the id and name), as OpenAI streams them.
        if self.tool_calls is None:
            self.tool_calls = []
        last = self.tool_calls[-1] if self.tool_calls else None
        if last is not None and last.index == piece.index and piece.id is None:
            self.tool_calls[-1] = ToolCallDelta(
                index=last.index,
                id=last.id,
                name=last.name,
                arguments=last.arguments + piece.arguments,
            )
        else:
            self.tool_calls.append(piece)

    def add_reasoning(self, piece: str) -> None:
        if self.reasoning is None:
            self.reasoning = []
        self.reasoning.append(piece)

    def add_logprob(self, entry: TokenLogprob) -> None:
        if self.logprobs is None:
            self.logprobs = []
        self.logprobs.append(entry)

    def delta(self, index: int) -> Delta:
        text = self.text[0] if len(self.text) == 1 else "".join(self.text)
        return Delta(
            text=text,
            num_tokens=self.tokens,
            finish_reason=self.finish,
            index=index,
            reasoning="".join(self.reasoning) if self.reasoning else "",
            reasoning_tokens=self.reasoning_tokens,
            tool_calls=tuple(self.tool_calls) if self.tool_calls else (),
            logprobs=tuple(self.logprobs) if self.logprobs else (),
            stop_reason=self.stop_reason,
        )


class _Collector:
    """Buffers a request's output until its consumer takes it, merging steps meanwhile.

    This is what makes streaming cheap under load: a consumer that falls behind receives one
    Delta per choice holding every token produced since it last looked, not one per token.
    """

    __slots__ = ("_buffers", "_ready", "_unfinished", "_waiter", "prompt_logprobs")

    def __init__(self, choices: int) -> None:
        self._buffers: dict[int, _Buffer] = {}
        self._unfinished = choices
        # Output waits (or the request ended) since the consumer last took it; the consumer's
        # future while it waits. (An asyncio.Event does the same with a deque of waiters and a
        # new future per wait: this is on every token's path.)
        self._ready = False
        self._waiter: asyncio.Future[None] | None = None
        self.prompt_logprobs: tuple[TokenLogprob, ...] | None = None

    def buffer(self, index: int) -> _Buffer:
        buffer = self._buffers.get(index)
        if buffer is None:
            buffer = self._buffers[index] = _Buffer()
        return buffer

    def finish(self, index: int, reason: FinishReason, stop_reason: str | int | None) -> None:
        buffer = self.buffer(index)
        buffer.finish, buffer.stop_reason = reason, stop_reason
        self._unfinished -= 1

    def wake(self) -> None:
        self._ready = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def waiter(self) -> asyncio.Future[None] | None:
        """What the consumer awaits before `take`: None when output already waits, else a
        future the next `wake` resolves. (Awaited by the consumer itself, not in a coroutine of
        ours: one frame fewer on every token's path.)"""
        if self._ready:
            return None
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        return waiter

    def take(self) -> tuple[list[Delta], bool]:
        """The choices' deltas since the last take, and whether every choice has finished."""
        self._ready = False
        self._waiter = None
        buffers = self._buffers
        if len(buffers) == 1:
            [(index, buffer)] = buffers.items()
            deltas = [buffer.delta(index)]
        else:
            deltas = [buffer.delta(index) for index, buffer in sorted(buffers.items())]
        buffers.clear()
        if deltas and self.prompt_logprobs is not None:
            deltas[0].prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, None
        return deltas, self._unfinished == 0


class _Call:
    """A tool call a choice will make: its id, function and argument pieces."""

    __slots__ = ("arguments", "id", "name")

    def __init__(self, call_id: str, name: str, arguments: str) -> None:
        self.id = call_id
        self.name = name
        self.arguments = text_pieces(arguments)


class _Choice:
    """One of a request's n sequences: what it will say, and where it is."""

    __slots__ = (
        "buffer_of",
        "calls",
        "finished",
        "holdback_chars",
        "index",
        "json_pieces",
        "length",
        "pending",
        "produced",
        "reasoning_tokens",
        "request",
        "rng",
        "seed",
    )

    def __init__(self, request: _Request, index: int, seed: int, length: int) -> None:
        self.request = request
        self.index = index
        self.seed = seed
        self.rng = random.Random(seed)
        # Tokens of free text the choice ends after, on top of its reasoning.
        self.length = length
        self.produced = 0
        self.reasoning_tokens = 0
        self.calls: list[_Call] = []
        self.json_pieces: list[str] | None = None
        # Content produced but not yet emitted. With stop strings, the last (longest stop - 1)
        # characters are held back until they can no longer begin a stop string, so a stop
        # string never reaches the client, as in vLLM.
        self.pending = ""
        self.holdback_chars = max((len(s) for s in request.options.stop), default=1) - 1
        self.finished = False

    # -- one token ------------------------------------------------------------------------------

    def step(self) -> bool:
        """Produces one token. Returns True when the choice has finished."""
        request = self.request
        options = request.options
        position = self.produced
        self.produced += 1
        buffer = request.collector.buffer(self.index)
        buffer.tokens += 1
        at_limit = self.produced >= options.max_tokens
        if position < self.reasoning_tokens:
            buffer.reasoning_tokens += 1
            token, piece = self._sample(position, first=position == 0)
            self._logprob(buffer, token, piece, position, forced=False)
            if request.include_reasoning:
                buffer.add_reasoning(piece)
            if token in request.stop_token_ids:
                return self._finish(FinishReason.STOP, token)
            return self._finish(FinishReason.LENGTH) if at_limit else False
        body = position - self.reasoning_tokens
        if self.calls:
            return self._tool_step(buffer, body, position, at_limit)
        if self.json_pieces is not None:
            piece = self.json_pieces[body]
            self._logprob(buffer, token_id(piece, request.vocab_size), piece, position, forced=True)
            done = body + 1 >= len(self.json_pieces)
            return self._content(
                piece, FinishReason.LENGTH if at_limit else FinishReason.STOP, done or at_limit
            )
        token, piece = self._sample(position, first=body == 0)
        self._logprob(buffer, token, piece, position, forced=False)
        if token in request.stop_token_ids:
            if options.include_stop_str_in_output:
                self.pending += piece
            self._flush()
            return self._finish(FinishReason.STOP, token)
        done = body + 1 >= self.length
        return self._content(
            piece, FinishReason.LENGTH if at_limit else FinishReason.STOP, done or at_limit
        )

    def _sample(self, position: int, *, first: bool) -> tuple[int, str]:
        """The next free-text token: the model's word, unless logit_bias moves the choice.

        Every candidate the bias names has a logit 1 to 20 below the model's word (by a hash of
        the step), plus its bias; the highest wins. So +100 forces a token and -100 bans one.
        """
        word = self.rng.randrange(_WORDS)
        bias = self.request.options.logit_bias
        token = word
        if bias:
            best = bias.get(word, 0.0)
            for candidate, value in bias.items():
                if candidate == word:
                    continue
                score = value - (1 + _mix(self.seed, position, candidate) % 20)
                if score > best or (score == best and candidate < token):
                    token, best = candidate, score
            if best <= -100:
                token = self._unbanned(word)
        text = token_text(token)
        return token, text if first else " " + text

    def _unbanned(self, word: int) -> int:
        bias = self.request.options.logit_bias
        for offset in range(1, _WORDS + len(bias) + 1):
            candidate = (word + offset) % _WORDS if offset < _WORDS else _FIRST_OPEN_ID + offset
            if bias.get(candidate, 0.0) > -100:
                return candidate
        raise AssertionError("logit_bias holds at most 300 entries, fewer than the vocabulary")

    def _logprob(
        self, buffer: _Buffer, token: int, piece: str, position: int, *, forced: bool
    ) -> None:
        k = self.request.options.logprobs
        if k is None:
            return
        u = _unit(self.seed, position, token)
        # A token a grammar forces (JSON, a tool call) is near certain; free text less so.
        probability = 0.99 + 0.0099 * u if forced else 0.4 + 0.59 * u
        buffer.add_logprob(_entry(token, piece, probability, k, self.seed, position))

    def _tool_step(self, buffer: _Buffer, body: int, position: int, at_limit: bool) -> bool:
        # Each call is its name (one token) and then its argument pieces.
        for number, call in enumerate(self.calls):
            if body == 0:
                buffer.add_tool_piece(ToolCallDelta(index=number, id=call.id, name=call.name))
                self._logprob(
                    buffer,
                    token_id(call.name, self.request.vocab_size),
                    call.name,
                    position,
                    forced=True,
                )
                break
            body -= 1
            if body < len(call.arguments):
                piece = call.arguments[body]
                buffer.add_tool_piece(ToolCallDelta(index=number, arguments=piece))
                self._logprob(
                    buffer, token_id(piece, self.request.vocab_size), piece, position, forced=True
                )
                last = number == len(self.calls) - 1 and body == len(call.arguments) - 1
                if last:
                    return self._finish(FinishReason.TOOL_CALLS)
                break
            body -= len(call.arguments)
        return self._finish(FinishReason.LENGTH) if at_limit else False

    # -- content and its stop strings -------------------------------------------------------------

    def _content(self, piece: str, reason: FinishReason, done: bool) -> bool:
        stops = self.request.options.stop
        if not stops:
            self.request.collector.buffer(self.index).text.append(piece)
            return self._finish(reason) if done else False
        self.pending += piece
        for stop in stops:
            cut = self.pending.find(stop)
            if cut >= 0:
                keep = cut + len(stop) if self.request.options.include_stop_str_in_output else cut
                self.pending = self.pending[:keep]
                self._flush()
                return self._finish(FinishReason.STOP, stop)
        if done:
            self._flush()
            return self._finish(reason)
        ready = len(self.pending) - self.holdback_chars
        if ready > 0:
            self.request.collector.buffer(self.index).text.append(self.pending[:ready])
            self.pending = self.pending[ready:]
        return False

    def _flush(self) -> None:
        if self.pending:
            self.request.collector.buffer(self.index).text.append(self.pending)
            self.pending = ""

    def _finish(self, reason: FinishReason, stop_reason: str | int | None = None) -> bool:
        self._flush()
        self.finished = True
        self.request.collector.finish(self.index, reason, stop_reason)
        return True

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.request.collector.finish(self.index, FinishReason.ABORT, None)


class _Request:
    """One request inside the engine: its choices and its output buffer."""

    __slots__ = (
        "choices",
        "collector",
        "finished",
        "id",
        "include_reasoning",
        "options",
        "prompt",
        "ready_at",
        "stop_token_ids",
        "vocab_size",
    )

    def __init__(
        self, request_id: str, prompt: Prompt, options: SamplingOptions, vocab_size: int
    ) -> None:
        self.id = request_id
        self.prompt = prompt
        self.options = options
        self.vocab_size = vocab_size
        self.stop_token_ids = frozenset(options.stop_token_ids)
        self.include_reasoning = prompt.chat is None or prompt.chat.include_reasoning
        self.collector = _Collector(options.n)
        self.choices: list[_Choice] = []
        self.ready_at = 0.0
        self.finished = False

    def step(self) -> bool:
        """Advances every unfinished choice by one token. Returns True when all have finished."""
        finished = True
        for choice in self.choices:
            if not choice.finished and not choice.step():
                finished = False
        self.collector.wake()
        if finished:
            self.finished = True
        return finished

    def abort(self) -> None:
        for choice in self.choices:
            choice.abort()
        self.finished = True
        self.collector.wake()


def _choice_seed(prompt: Prompt, options: SamplingOptions, index: int) -> int:
    """Greedy sampling depends on the prompt only (every choice alike, as in vLLM); otherwise on
    the prompt and the seed, choice i sampling with seed + i (vLLM's parallel sampling)."""
    if options.temperature == 0:
        material = prompt.text
    elif options.seed is not None:
        material = f"{options.seed + index}\x00{prompt.text}"
    else:
        return random.getrandbits(64)
    return int.from_bytes(hashlib.blake2b(material.encode(), digest_size=8).digest(), "big")


def _answered_tools(prompt_text: str) -> bool:
    """Whether tool results came after the user's last message (the template's own marks)."""
    return prompt_text.rfind("<|tool|>") > prompt_text.rfind("<|user|>")


class SimulatedEngine:
    """A deterministic engine with a GPU-like timing model, driven by one step loop."""

    kind = "simulated"
    supports_embeddings = True

    def __init__(self, model_id: str, config: SimulatedEngineConfig) -> None:
        if config.max_batch < 1 or config.max_queue < 0:
            raise ValueError("simulated engine needs max_batch >= 1 and max_queue >= 0")
        if not 1 <= config.min_answer_tokens <= config.max_answer_tokens:
            raise ValueError("simulated engine needs 1 <= min_answer_tokens <= max_answer_tokens")
        if config.vocab_size <= _FIRST_OPEN_ID:
            raise ValueError(f"simulated engine needs vocab_size > {_FIRST_OPEN_ID}")
        self._model_id = model_id
        self._config = config
        self._state = EngineState.STARTING
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: dict[str, _Request] = {}
        self._running_choices = 0
        self._by_id: dict[str, _Request] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def vocab_size(self) -> int:
        return self._config.vocab_size

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

    # -- prompts -------------------------------------------------------------------------------

    async def render_chat(
        self, messages: Sequence[ChatMessage], context: ChatContext | None = None
    ) -> Prompt:
        if context is not None:
            check_chat_context(context)
            self._reasoning_budget(context)  # refuses an unknown effort now, not mid-stream
        text = render_template(messages, context)
        return Prompt(text=text, num_tokens=await count_text_tokens_yielding(text), chat=context)

    async def render_completion(self, prompt: str | Sequence[int]) -> Prompt:
        if isinstance(prompt, str):
            return Prompt(text=prompt, num_tokens=await count_text_tokens_yielding(prompt))
        ids = tuple(prompt)
        check_token_ids(ids, self.vocab_size, "prompt")
        text = " ".join(token_text(i) for i in ids)
        return Prompt(text=text, num_tokens=len(ids), token_ids=ids)

    async def count_tokens(self, text: str) -> int:
        return await count_text_tokens_yielding(text)

    # -- requests ------------------------------------------------------------------------------

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
        request = self._new_request(request_id, prompt, options)
        self._by_id[request_id] = request
        self._waiting.append(request)
        self._wake.set()
        try:
            collector = request.collector
            while True:
                waiter = collector.waiter()
                if waiter is not None:
                    await waiter
                deltas, done = collector.take()
                if done:
                    deltas[-1].prompt_tokens = prompt.num_tokens
                for delta in deltas:
                    yield delta
                if done:
                    return
        finally:
            # Reached on normal end, on an abort, and when the consumer closes or is cancelled.
            if not request.finished:
                self._finish_aborted(request)
            self._by_id.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        request = self._by_id.get(request_id)
        if request is not None and not request.finished:
            self._finish_aborted(request)

    def _new_request(self, request_id: str, prompt: Prompt, options: SamplingOptions) -> _Request:
        """The request with each choice planned: reasoning, then tool calls, JSON or text."""
        check_options(options, self.vocab_size)
        if prompt.token_ids is not None:
            check_token_ids(prompt.token_ids, self.vocab_size, "prompt")
        request = _Request(request_id, prompt, options, self.vocab_size)
        if options.prompt_logprobs is not None:
            request.collector.prompt_logprobs = self._prompt_logprobs(
                prompt, options.prompt_logprobs
            )
        budget = self._reasoning_budget(prompt.chat)
        for index in range(options.n):
            seed = _choice_seed(prompt, options, index)
            choice = _Choice(request, index, seed, self._answer_length(prompt, options, index))
            if budget:
                choice.reasoning_tokens = budget + _mix(seed, 0, 1) % (budget // 2 + 1)
            choice.calls = self._tool_calls(prompt, seed)
            if not choice.calls and options.response_format.type is not ResponseFormatType.TEXT:
                choice.json_pieces = text_pieces(self._json_answer(options, seed))
            request.choices.append(choice)
        return request

    def _answer_length(self, prompt: Prompt, options: SamplingOptions, index: int) -> int:
        if options.ignore_eos:
            return options.max_tokens
        # Choices of a greedy request are alike; others end at lengths of their own.
        salt = "" if index == 0 or options.temperature == 0 else f"{index}\x00"
        digest = hashlib.blake2b(
            f"{self._config.seed}\x00{salt}{prompt.text}".encode(), digest_size=4
        ).digest()
        span = self._config.max_answer_tokens - self._config.min_answer_tokens + 1
        natural = self._config.min_answer_tokens + int.from_bytes(digest, "big") % span
        return min(natural, options.max_tokens)

    def _reasoning_budget(self, context: ChatContext | None) -> int:
        """Reasoning tokens before the answer: asked by reasoning_effort or a thinking switch
        of chat_template_kwargs, else the engine's default (config `reasoning`)."""
        if context is None:
            return 0
        effort = context.reasoning_effort
        switch = next(
            (
                context.template_kwargs[k]
                for k in _THINKING_SWITCHES
                if k in context.template_kwargs
            ),
            None,
        )
        if effort == "none" or switch is False:
            return 0
        if effort is not None:
            budget = _REASONING_TOKENS.get(effort)
            if budget is None:
                raise EngineRequestError(
                    f"reasoning_effort must be one of none, {', '.join(_REASONING_TOKENS)}.",
                    param="reasoning_effort",
                )
            return budget
        if switch is True or self._config.reasoning:
            return _REASONING_TOKENS["medium"]
        return 0

    def _tool_calls(self, prompt: Prompt, seed: int) -> list[_Call]:
        """The calls a choice makes: always for a required or named choice; for `auto`, half the
        time (by seed and prompt), and never right after tool results (the model answers)."""
        context = prompt.chat
        if context is None or not context.tools:
            return []
        mode = context.tool_choice.mode
        tools: Sequence[Tool] = context.tools
        if mode is ToolChoiceMode.NONE:
            return []
        if mode is ToolChoiceMode.AUTO and (_answered_tools(prompt.text) or _mix(seed, 1, 2) % 2):
            return []
        if mode is ToolChoiceMode.NAMED:
            tools = [t for t in tools if t.name == context.tool_choice.name]
        count = 1
        if mode is not ToolChoiceMode.NAMED and context.parallel_tool_calls and len(tools) > 1:
            count = 1 + _mix(seed, 2, 3) % 2
        first = _mix(seed, 3, 4) % len(tools)
        chosen = [tools[(first + k) % len(tools)] for k in range(count)]
        return [self._call(tool, seed, k) for k, tool in enumerate(chosen)]

    @staticmethod
    def _call(tool: Tool, seed: int, number: int) -> _Call:
        schema = tool.parameters if tool.parameters is not None else {"type": "object"}
        try:
            arguments = generate_instance(schema, random.Random(_hash64(seed, "arguments", number)))
        except SchemaError as exc:
            raise EngineRequestError(f"function {tool.name}: {exc}", param="tools") from exc
        call_id = f"call_{_hash64(seed, 'call', number):016x}"
        return _Call(call_id, tool.name, json.dumps(arguments, ensure_ascii=False))

    @staticmethod
    def _json_answer(options: SamplingOptions, seed: int) -> str:
        response_format = options.response_format
        schema = response_format.schema
        if response_format.type is ResponseFormatType.JSON_OBJECT or schema is None:
            # Any JSON object will do: a small one whose keys and values come from the seed.
            schema = {
                "type": "object",
                "properties": {"answer": {"type": "string"}, "score": {"type": "integer"}},
                "required": ["answer"],
            }
        try:
            value = generate_instance(schema, random.Random(_hash64(seed, "json")))
        except SchemaError as exc:
            raise EngineRequestError(str(exc), param="response_format") from exc
        return json.dumps(value, ensure_ascii=False)

    def _prompt_logprobs(self, prompt: Prompt, k: int) -> tuple[TokenLogprob, ...]:
        if prompt.token_ids is not None:
            tokens = [(i, token_text(i)) for i in prompt.token_ids]
        else:
            tokens = [(token_id(p, self.vocab_size), p) for p in text_pieces(prompt.text)]
        seed = _hash64(self._config.seed, prompt.text)
        entries = (
            [TokenLogprob(token_id=tokens[0][0], token=tokens[0][1], logprob=None)]
            if tokens
            else []
        )
        for position, (token, text) in enumerate(tokens[1:], start=1):
            probability = 0.05 + 0.9 * _unit(seed, position, token)
            entries.append(_entry(token, text, probability, k, seed, position))
        return tuple(entries)

    # -- embeddings -----------------------------------------------------------------------------

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

    def _vector(self, material: bytes, size: int) -> list[float]:
        """A unit vector that follows from the input and the seed. Its first `size` components
        are those of the full vector, normalised again, as a model's shortened embeddings are.
        Drawn from a hash (fast, in C) rather than a Python RNG: 2,048 inputs take
        milliseconds, not seconds."""
        digest = hashlib.shake_256(self._config.seed.to_bytes(8, "big") + material).digest(4 * size)
        raw = struct.unpack(f"<{size}i", digest)
        scale = 1.0 / (math.hypot(*raw) or 1.0)
        return [x * scale for x in raw]

    # -- the step loop --------------------------------------------------------------------------

    def _finish_aborted(self, request: _Request) -> None:
        if self._running.pop(request.id, None) is not None:
            self._running_choices -= len(request.choices)
        elif request in self._waiting:
            self._waiting.remove(request)
        if not request.finished:
            request.abort()

    async def _run(self) -> None:
        """The step loop: admit waiting requests, sleep one step, advance every running one.

        The batch counts sequences, as a GPU's does: a request with n choices takes n places
        (and is admitted alone when n exceeds the batch, so it cannot wait forever).
        """
        config = self._config
        while True:
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = time.monotonic()
            while self._waiting and (
                not self._running
                or self._running_choices + len(self._waiting[0].choices) <= config.max_batch
            ):
                request = self._waiting.popleft()
                prefill_ms = config.ttft_ms + config.prefill_ms_per_1k_tokens * (
                    request.prompt.num_tokens / 1000
                )
                request.ready_at = now + prefill_ms / 1000
                self._running[request.id] = request
                self._running_choices += len(request.choices)
            step_ms = config.tpot_ms * (1 + config.batch_slowdown * (self._running_choices - 1))
            await asyncio.sleep(step_ms / 1000)
            now = time.monotonic()
            for request in list(self._running.values()):
                if request.ready_at <= now and request.step():
                    del self._running[request.id]
                    self._running_choices -= len(request.choices)
