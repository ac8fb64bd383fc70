"""OpenAI's REST request types, decoded straight from the request body with msgspec.

What the edge serves is declared with its type; what it refuses is declared by
`corvex.api_params` (each refused parameter becomes a field of the decoded type, so a request
that sends one is refused by name, and docs/api.md cannot drift from the code); anything else is
ignored (and logged at debug by `gateway.decoding`). Type errors become 400s naming the field.
Numbers bound for unsigned or 32-bit wire fields are bounded here, so nothing unrepresentable is
forwarded; the real bounds (n, vocabulary, schemas) are the core's. Text that the core may quote
back in an error (a model id, a role, a function name) is bounded here too. Responses are built
where they are sent, since their shapes are fixed.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Final, Literal, TypeVar, cast

import msgspec

from corvex import api_params
from corvex.api_params import Endpoint
from corvex.model_ids import MAX_MODEL_ID_CHARS
from gateway.errors import BadRequest

# OpenAI's roles are single words ("system", "developer", "user", "assistant", "tool"); the
# core decides which it serves, the edge only refuses what cannot be a role.
MAX_ROLE_CHARS: Final = 32
# OpenAI's bound on function and schema names (a-z, A-Z, 0-9, _ and -, at most 64).
MAX_NAME_CHARS: Final = 64
# reasoning_effort's longest value is "minimal"; room for what newer clients send.
MAX_EFFORT_CHARS: Final = 32
# The engines' bound on log probabilities per token (corvex_core.engines.base, a test holds
# them together), checked here too where the core would name another field: completions'
# `logprobs` and `prompt_logprobs` arrive in the core as fields of other names.
MAX_LOGPROBS: Final = 20

ModelId = Annotated[str, msgspec.Meta(max_length=MAX_MODEL_ID_CHARS)]
Role = Annotated[str, msgspec.Meta(max_length=MAX_ROLE_CHARS)]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
UInt32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
Int32 = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]


# ---- chat messages -------------------------------------------------------------------------


class TextPart(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class FunctionCall(msgspec.Struct):
    name: str
    # JSON text, as the model wrote it.
    arguments: str


class ToolCall(msgspec.Struct, kw_only=True):
    """A call an assistant message made (the history of a tool loop)."""

    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class Message(msgspec.Struct, kw_only=True):
    role: Role
    # A string, a list of text parts, or null (an assistant turn without text).
    content: str | list[TextPart] | None = None
    name: str | None = None
    # An assistant message: the calls it made; a tool message: the call it answers.
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # An assistant message's reasoning, sent back by some agent loops: vLLM's name for it, and
    # the older one it still reads.
    reasoning: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


# ---- tools and structured output -------------------------------------------------------------


class FunctionDefinition(msgspec.Struct, kw_only=True):
    name: Name
    description: str | None = None
    # A JSON Schema; None: the function takes no parameters.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, kw_only=True):
    function: FunctionDefinition
    # OpenAI's other kinds ("custom") are refused here, by this type.
    type: Literal["function"] = "function"


class NamedFunction(msgspec.Struct):
    name: Name


class NamedToolChoice(msgspec.Struct, kw_only=True):
    function: NamedFunction
    type: Literal["function"] = "function"


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class TextFormat(msgspec.Struct, tag="text", tag_field="type"):
    pass


class JsonObjectFormat(msgspec.Struct, tag="json_object", tag_field="type"):
    pass


class JsonSchema(msgspec.Struct, kw_only=True):
    name: Name
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class JsonSchemaFormat(msgspec.Struct, tag="json_schema", tag_field="type"):
    json_schema: JsonSchema


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = False
    # vLLM's: usage in every chunk (with include_usage).
    continuous_usage_stats: bool | None = False


# ---- requests --------------------------------------------------------------------------------


class GenerationRequest(msgspec.Struct, kw_only=True):
    """What chat and completions requests share: sampling, stop conditions, n, streaming."""

    model: ModelId
    temperature: float | None = None
    top_p: float | None = None
    n: UInt32 | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Token id (as JSON object keys are: text) → bias.
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extensions.
    top_k: Int32 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[UInt32] | None = None
    include_stop_str_in_output: bool | None = False
    # Keep generating to max_tokens (used by benchmarks).
    ignore_eos: bool | None = False
    prompt_logprobs: UInt32 | None = None


class ChatCompletionRequest(GenerationRequest, kw_only=True):
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: UInt32 | None = None
    reasoning_effort: Annotated[str, msgspec.Meta(max_length=MAX_EFFORT_CHARS)] | None = None
    # vLLM's.
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool | None = None


class CompletionRequest(GenerationRequest, kw_only=True):
    # A string, token ids, or a list of one of those (several are refused: see completions).
    prompt: str | list[str | int | list[int]]
    # OpenAI's default is 16 tokens; null asks for as many as the context and balance allow.
    max_tokens: int | msgspec.UnsetType | None = msgspec.UNSET
    echo: bool | None = False
    logprobs: UInt32 | None = None


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: ModelId
    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    input: str | list[str | int | list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


# ---- what is refused, from the table ----------------------------------------------------------

T = TypeVar("T", bound=msgspec.Struct)


def _refusing(base: type[T], endpoint: Endpoint) -> type[T]:
    """`base` with a field for each parameter the table refuses on `endpoint`, so a body that
    sends one is seen (unknown fields are dropped by the decoder)."""
    declared = set(base.__struct_fields__)
    names = sorted(api_params.refused(endpoint))
    assert declared.isdisjoint(names), f"{endpoint.value}: a refused parameter is declared"
    fields = [(name, Any, msgspec.UNSET) for name in names]
    return cast(type[T], msgspec.defstruct(base.__name__, fields, bases=(base,), kw_only=True))


@functools.cache
def _refused_rows(endpoint: Endpoint) -> tuple[api_params.Param, ...]:
    """The refused parameters' rows by name (the table is fixed: read once, not per request)."""
    return tuple(api_params.param(endpoint, name) for name in sorted(api_params.refused(endpoint)))


def check_refused(parsed: msgspec.Struct, endpoint: Endpoint) -> None:
    """A 400 naming the first refused parameter the request asks for (null, or the value
    that asks for nothing, passes)."""
    for row in _refused_rows(endpoint):
        name = row.name
        value = getattr(parsed, name, msgspec.UNSET)
        if value is msgspec.UNSET:
            continue
        if not api_params.is_default(row, value):
            raise BadRequest(
                f"The parameter {name} is not supported: {row.note}. docs/api.md lists "
                "every parameter and what is served.",
                param=name,
            )


# The types the routes decode; instances are of these (sub)classes.
CHAT_REQUEST: Final = _refusing(ChatCompletionRequest, Endpoint.CHAT)
COMPLETION_REQUEST: Final = _refusing(CompletionRequest, Endpoint.COMPLETIONS)
EMBEDDING_REQUEST: Final = _refusing(EmbeddingRequest, Endpoint.EMBEDDINGS)

chat_decoder = msgspec.json.Decoder(CHAT_REQUEST)
completion_decoder = msgspec.json.Decoder(COMPLETION_REQUEST)
embedding_decoder = msgspec.json.Decoder(EMBEDDING_REQUEST)
