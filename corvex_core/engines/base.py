"""The engine seam: what the core needs from anything that generates tokens.

An engine renders a conversation (or a completions prompt) into a prompt, streams the tokens of
a request's choices (content, reasoning, tool calls and log probabilities, each in the Delta
field the OpenAI framing needs), aborts it, embeds, and reports its health. The core never
imports a concrete engine outside `corvex_core.engines.registry`; the simulated engine and the
vLLM adapter both live behind this protocol, so everything above it is tested without a GPU.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Protocol, runtime_checkable

import msgspec

# Bounds of what one request may ask of an engine (TigerStyle: a limit on everything). The
# OpenAI API's own limits where it has one.
MAX_CHOICES = 16  # n
MAX_TOP_LOGPROBS = 20  # top_logprobs on chat, logprobs on completions (OpenAI: 20 and 5)
MAX_LOGIT_BIAS = 300  # logit_bias entries (OpenAI: 300)
MAX_STOP_TOKEN_IDS = 64
MAX_TOOLS = 128  # OpenAI: 128 functions
MAX_TOOL_NAME_CHARS = 64  # OpenAI: a-z, A-Z, 0-9, _ and -, at most 64
MAX_TEMPLATE_KWARGS = 32  # chat_template_kwargs entries


class FinishReason(enum.Enum):
    """Why a choice ended. Values are OpenAI's `finish_reason` strings (and vLLM's "abort")."""

    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    ABORT = "abort"


class EngineState(enum.Enum):
    """Lifecycle of an engine. Only READY engines are given requests."""

    STARTING = "starting"
    READY = "ready"
    DEAD = "dead"
    STOPPED = "stopped"


# -- what a request asks for ---------------------------------------------------------------------


class ToolCall(msgspec.Struct, frozen=True):
    """A call of a function by the assistant: in the history, and in a finished answer."""

    id: str
    name: str
    # JSON text, as OpenAI sends it (not necessarily valid: models can be cut short).
    arguments: str


class ChatMessage(msgspec.Struct, frozen=True):
    """One message of a conversation, content already flattened to text.

    `role` is "system", "user", "assistant" or "tool" (the edge maps "developer" to "system").
    An assistant message may carry the `tool_calls` it made and the `reasoning` it showed; a
    tool message answers the call named by `tool_call_id`.
    """

    role: str
    content: str
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    reasoning: str | None = None


class Tool(msgspec.Struct, frozen=True):
    """A function the model may call. `parameters` is a JSON Schema (None: takes nothing)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool = False


class ToolChoiceMode(enum.Enum):
    """OpenAI's tool_choice: "none", "auto", "required", or one named function."""

    NONE = "none"
    AUTO = "auto"
    REQUIRED = "required"
    NAMED = "named"


class ToolChoice(msgspec.Struct, frozen=True):
    """How the model may use the tools; `name` is set exactly when the mode is NAMED."""

    mode: ToolChoiceMode = ToolChoiceMode.AUTO
    name: str | None = None


class ChatContext(msgspec.Struct, frozen=True):
    """What a chat request gives the template besides its messages, and the answer's parser.

    The engine keeps it in the Prompt it renders (`Prompt.chat`), so the template and the
    parsing of the answer see the same tools.
    """

    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    parallel_tool_calls: bool = True
    # OpenAI's reasoning_effort ("none", "minimal", "low", "medium", "high", ...), for templates
    # that take it; vLLM also turns it into `enable_thinking`.
    reasoning_effort: str | None = None
    # vLLM's chat_template_kwargs: per-request template variables, e.g. {"enable_thinking":
    # true} or {"thinking": false}, over the model's configured ones.
    template_kwargs: dict[str, Any] = msgspec.field(default_factory=dict)
    # False drops the reasoning from the answer (vLLM's include_reasoning); it is still billed.
    include_reasoning: bool = True


class Prompt(msgspec.Struct, frozen=True):
    """A rendered prompt. `num_tokens` is the engine's own count and is what gets billed."""

    text: str
    num_tokens: int
    # Token ids when the engine tokenized the prompt itself (vLLM); None for engines that only
    # count. Passing ids on to generation avoids tokenizing twice.
    token_ids: tuple[int, ...] | None = None
    # The chat request this prompt was rendered from; None for a completions prompt (no
    # template, no tools, no reasoning parser).
    chat: ChatContext | None = None
    # What the engine that rendered the prompt keeps for generating it (the vLLM adapter: the
    # conversation as vLLM's request object takes it). Opaque to everything else.
    engine_data: object = None


class ResponseFormatType(enum.Enum):
    TEXT = "text"
    JSON_OBJECT = "json_object"
    JSON_SCHEMA = "json_schema"


class ResponseFormat(msgspec.Struct, frozen=True):
    """OpenAI's response_format: free text, any JSON object, or JSON valid against `schema`."""

    type: ResponseFormatType = ResponseFormatType.TEXT
    schema: dict[str, Any] | None = None
    name: str | None = None
    strict: bool = False


class Sampling(msgspec.Struct, frozen=True):
    """What a request asks of generation, already validated and bounded by the core, but for
    the completion bound, which admission decides (see `bounded`). `None` means the engine's
    default. The engine checks what only it can know (token ids against its vocabulary,
    schemas it can serve) and raises EngineRequestError naming the param.
    """

    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool = False
    # Choices generated for the one prompt (OpenAI's n). The engine generates them together,
    # as vLLM does (SamplingParams.n): the prompt is computed and billed once.
    n: int = 1
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    # Token id -> bias in [-100, 100] added to its logit: -100 bans it, 100 forces it.
    logit_bias: dict[int, float] = msgspec.field(default_factory=dict)
    # Log probabilities of each generated token and its `logprobs` most likely alternatives
    # (0: the sampled token's only). None: no log probabilities. Chat's logprobs=true +
    # top_logprobs=k and completions' logprobs=k both arrive as k.
    logprobs: int | None = None
    # The same for the prompt's tokens (completions' echo with logprobs; vLLM's
    # prompt_logprobs). None: none.
    prompt_logprobs: int | None = None
    response_format: ResponseFormat = ResponseFormat()

    def bounded(self, max_tokens: int) -> SamplingOptions:
        """The options an engine runs with, once admission resolved the bound."""
        return SamplingOptions(max_tokens=max_tokens, **msgspec.structs.asdict(self))


class SamplingOptions(Sampling, frozen=True, kw_only=True):
    """Sampling with `max_tokens` (per choice) resolved from the request, the context, the
    balance and the key's limits: what an engine's `generate` receives."""

    max_tokens: int


# -- what an engine answers ----------------------------------------------------------------------


class TopLogprob(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One candidate token at a position and its log probability."""

    token_id: int
    token: str
    logprob: float


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A generated (or prompt) token, its log probability and the most likely candidates.

    `top` is sorted, most likely first, and holds as many candidates as asked; the token itself
    is among them when it is one of the most likely. A prompt's first token has no logprob
    (None), as in vLLM. OpenAI's `bytes` are `token.encode("utf-8", errors="replace")`.
    """

    token_id: int
    token: str
    logprob: float | None
    top: tuple[TopLogprob, ...] = ()


class ToolCallDelta(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A piece of a tool call, framed as OpenAI streams it: the call's first piece has its `id`
    and `name` (and maybe the start of its arguments), the later ones only argument text.

    `index` is the call's position within its choice's answer.
    """

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class Delta(msgspec.Struct, omit_defaults=True, gc=False):
    """Output of one choice of a request since the previous Delta of that choice.

    Everything is per delta: `text` (content), `reasoning` and `tool_calls` pieces, `logprobs`
    of the tokens it covers, and `num_tokens` (all generated tokens, of every kind, that it
    covers; `reasoning_tokens` of them were reasoning). `index` is the choice (0 ..
    n-1). `finish_reason` is set on a choice's last delta. The last delta of the whole request
    has `prompt_tokens` set (the engine's count, which the bill uses): with n = 1 that is the
    delta with `finish_reason`, with n > 1 the last of the choices to finish (see `is_last`).
    An engine may merge several steps into one Delta when its consumer is slower than it, and
    interleaves the deltas of different choices.
    """

    text: str
    num_tokens: int
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    cached_prompt_tokens: int = 0
    index: int = 0
    reasoning: str = ""
    reasoning_tokens: int = 0
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    # With prompt_logprobs asked: on the request's first delta only.
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    # What ended the choice when it was a stop string (str) or a stop token id (int).
    stop_reason: str | int | None = None

    @property
    def is_last(self) -> bool:
        """Whether this is the request's last delta (every choice has finished)."""
        return self.prompt_tokens is not None


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

    @property
    def vocab_size(self) -> int:
        """Token ids are 0 .. vocab_size - 1 (what logit_bias and token-id prompts may name)."""
        ...

    async def render_chat(
        self, messages: Sequence[ChatMessage], context: ChatContext | None = None
    ) -> Prompt:
        """Applies the model's chat template (with the context's tools) and tokenizes it.

        Raises EngineRequestError (naming the param) for tools, schemas or a tool choice the
        engine cannot serve, and for a conversation the template rejects.
        """
        ...

    async def render_completion(self, prompt: str | Sequence[int]) -> Prompt:
        """A completions prompt: plain text or token ids, no template. Raises
        EngineRequestError for a token id outside the vocabulary."""
        ...

    async def count_tokens(self, text: str) -> int:
        """Tokens in a plain text, without any template."""
        ...

    def generate(
        self, request_id: str, prompt: Prompt, options: SamplingOptions
    ) -> AsyncGenerator[Delta, None]:
        """Streams a request's output, every choice's. The last Delta has `prompt_tokens` set.

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
