"""The engine seam: what the core needs from anything that generates tokens.

An engine renders a conversation into a prompt, streams the tokens of a request, aborts it,
embeds, and reports its health. The core never imports a concrete engine outside
`corvex_core.engines.registry`; the simulated engine and the vLLM adapter both live behind
this protocol, so everything above it is tested without a GPU.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Sequence
from typing import Protocol, runtime_checkable

import msgspec


class FinishReason(enum.Enum):
    """Why a generation ended. Values are OpenAI's `finish_reason` strings."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


class EngineState(enum.Enum):
    """Lifecycle of an engine. Only READY engines are given requests."""

    STARTING = "starting"
    READY = "ready"
    DEAD = "dead"
    STOPPED = "stopped"


class ChatMessage(msgspec.Struct, frozen=True):
    """One message of a conversation, content already flattened to text."""

    role: str
    content: str
    name: str | None = None


class Prompt(msgspec.Struct, frozen=True):
    """A rendered prompt. `num_tokens` is the engine's own count and is what gets billed."""

    text: str
    num_tokens: int
    # Token ids when the engine tokenized the prompt itself (vLLM); None for engines that only
    # count. Passing ids on to generation avoids tokenizing twice.
    token_ids: tuple[int, ...] | None = None


class SamplingOptions(msgspec.Struct, frozen=True):
    """Per-request generation settings, already validated and bounded by the core.

    `max_tokens` is always set: the core resolves it from the request, the context, the
    balance and the key's limits before the engine sees the request. `None` in the other
    fields means the engine's default.
    """

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool = False


class Delta(msgspec.Struct):
    """Output of one request since the previous Delta.

    `text` and `num_tokens` are per delta. `finish_reason` is set on the last delta only, and
    the last delta also carries the engine's prompt-token counts, which the bill uses.
    An engine may merge several steps into one Delta when its consumer is slower than it.
    """

    text: str
    num_tokens: int
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    cached_prompt_tokens: int = 0


class EmbedInput(msgspec.Struct, frozen=True):
    """One input to embed: a text or a sequence of token ids (exactly one is set)."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None


class Embeddings(msgspec.Struct, frozen=True):
    """Unit-length vectors in input order, and the tokens they consumed."""

    vectors: list[list[float]]
    prompt_tokens: int


class EngineStats(msgspec.Struct, frozen=True):
    """Instantaneous load of an engine."""

    running: int
    waiting: int


class EngineError(Exception):
    """Base of the errors an engine raises. The core maps them to the error table."""


class EngineUnavailableError(EngineError):
    """The engine cannot take the request now: queue full, still starting, or dead.

    `retry_after_s` is a hint for callers when retrying soon may succeed (None: no hint).
    """

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineRequestError(EngineError):
    """The engine rejected the request's content (e.g. a parameter vLLM validates).

    `param` names the request field when known.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@runtime_checkable
class Engine(Protocol):
    """A model's token generator. One instance serves one catalogue model id."""

    @property
    def model_id(self) -> str:
        """The catalogue id this engine serves."""
        ...

    @property
    def kind(self) -> str:
        """Short backend name shown to users: "simulated" or "vllm"."""
        ...

    @property
    def state(self) -> EngineState:
        """Current lifecycle state."""
        ...

    @property
    def supports_embeddings(self) -> bool:
        """Whether `embed` works for this model."""
        ...

    async def start(self) -> None:
        """Loads the model. Returns when the engine is READY; raises if it cannot start."""
        ...

    async def shutdown(self) -> None:
        """Aborts what is running and releases the model. Safe to call twice."""
        ...

    async def check_health(self) -> None:
        """Raises EngineUnavailableError if the engine is not able to serve."""
        ...

    async def render_chat(self, messages: Sequence[ChatMessage]) -> Prompt:
        """Applies the model's chat template and tokenizes the result."""
        ...

    async def count_tokens(self, text: str) -> int:
        """Tokens in a plain text, without any template."""
        ...

    def generate(
        self, request_id: str, prompt: Prompt, options: SamplingOptions
    ) -> AsyncGenerator[Delta, None]:
        """Streams a request's output. The last Delta has `finish_reason` set.

        Closing the iterator early (the consumer was cancelled or stopped reading) aborts the
        request in the engine. Raises EngineUnavailableError if the request is refused before
        it starts, EngineRequestError for a request the engine cannot run.
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Aborts a running or queued request; a no-op for unknown or finished ids."""
        ...

    async def embed(self, inputs: Sequence[EmbedInput], dimensions: int | None) -> Embeddings:
        """Embeds the inputs. Raises EngineRequestError if the model cannot embed."""
        ...

    def stats(self) -> EngineStats:
        """Running and waiting requests right now."""
        ...
