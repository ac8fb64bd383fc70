"""Wire ⇄ domain for the Inference service: requests become `serving` parameters and engine
`Sampling`, deltas become `ChatChunk`s. It validates what the wire types cannot express (ranges,
JSON text, one-of rules) and nothing else: bounds an engine knows (vocabulary, schemas it can
serve, tool names) are the engine's checks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeVar

import msgspec

from corvex.quoting import quote
from corvex.v1 import inference_pb2
from corvex_core import errors
from corvex_core.engines.base import (
    MAX_CHOICES,
    ChatContext,
    ChatMessage,
    Delta,
    FinishReason,
    ResponseFormat,
    ResponseFormatType,
    Sampling,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
)
from corvex_core.records import Charged
from corvex_core.serving import ChatParams, CompletionParams

ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_MESSAGES: Final = 4096
MAX_STOP: Final = 4
# JSON text in a request (a schema, template variables): bounded before it is parsed.
MAX_JSON_CHARS: Final = 256 * 1024

_FINISH: Final = {
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.TOOL_CALLS: inference_pb2.FINISH_REASON_TOOL_CALLS,
    FinishReason.ABORT: inference_pb2.FINISH_REASON_ABORT,
}
_TOOL_CHOICE: Final = {
    inference_pb2.TOOL_CHOICE_MODE_AUTO: ToolChoiceMode.AUTO,
    inference_pb2.TOOL_CHOICE_MODE_NONE: ToolChoiceMode.NONE,
    inference_pb2.TOOL_CHOICE_MODE_REQUIRED: ToolChoiceMode.REQUIRED,
    inference_pb2.TOOL_CHOICE_MODE_NAMED: ToolChoiceMode.NAMED,
}
_RESPONSE_FORMAT: Final = {
    inference_pb2.RESPONSE_FORMAT_TYPE_TEXT: ResponseFormatType.TEXT,
    inference_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT: ResponseFormatType.JSON_OBJECT,
    inference_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: ResponseFormatType.JSON_SCHEMA,
}


# ---- wire → domain ---------------------------------------------------------------------------


def chat_params(request: inference_pb2.ChatRequest) -> ChatParams:
    sampling = sampling_of(request.sampling, has_max_tokens=request.HasField("max_tokens"))
    return ChatParams(
        model=request.model,
        messages=chat_messages(request.messages),
        max_tokens=_max_tokens(request),
        sampling=sampling,
        context=chat_context(request),
        whole=request.final_only,
    )


def completion_params(request: inference_pb2.CompleteRequest) -> CompletionParams:
    which = request.WhichOneof("prompt")
    if which == "tokens":
        if not request.tokens.ids:
            raise errors.InvalidRequest("prompt must not be empty", param="prompt")
        prompt: str | tuple[int, ...] = tuple(request.tokens.ids)
    elif request.text:
        prompt = request.text
    else:
        raise errors.InvalidRequest("prompt must not be empty", param="prompt")
    sampling = sampling_of(request.sampling, has_max_tokens=request.HasField("max_tokens"))
    if request.echo and sampling.prompt_logprobs is None and sampling.logprobs is not None:
        # OpenAI's echo with logprobs covers the prompt's tokens too.
        sampling = msgspec.structs.replace(sampling, prompt_logprobs=sampling.logprobs)
    return CompletionParams(
        model=request.model,
        prompt=prompt,
        max_tokens=_max_tokens(request),
        sampling=sampling,
        whole=request.final_only,
    )


def _max_tokens(request: Any) -> int | None:
    if not request.HasField("max_tokens"):
        return None
    if request.max_tokens < 1:
        raise errors.InvalidRequest("max_tokens must be at least 1", param="max_tokens")
    return int(request.max_tokens)


def chat_messages(messages: Sequence[inference_pb2.ChatMessage]) -> list[ChatMessage]:
    if not messages:
        raise errors.InvalidRequest("messages must contain at least one message", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise errors.InvalidRequest(
            f"messages may hold at most {MAX_MESSAGES} messages", param="messages"
        )
    return [_message(index, message) for index, message in enumerate(messages)]


def _message(index: int, message: inference_pb2.ChatMessage) -> ChatMessage:
    where = f"messages[{index}]"
    if message.role not in ROLES:
        raise errors.InvalidRequest(
            f"{where}.role must be one of {', '.join(sorted(ROLES))}, not {quote(message.role)}",
            param=f"{where}.role",
        )
    if message.tool_calls and message.role != "assistant":
        raise errors.InvalidRequest(
            f"{where}: only assistant messages carry tool_calls", param=f"{where}.tool_calls"
        )
    if message.role == "tool" and not message.tool_call_id:
        raise errors.InvalidRequest(
            f"{where}: a tool message needs the tool_call_id it answers",
            param=f"{where}.tool_call_id",
        )
    return ChatMessage(
        # The templates know "system"; OpenAI's newer name for it is "developer".
        role="system" if message.role == "developer" else message.role,
        content=message.content,
        name=message.name if message.HasField("name") else None,
        tool_calls=tuple(ToolCall(c.id, c.name, c.arguments) for c in message.tool_calls),
        tool_call_id=message.tool_call_id if message.HasField("tool_call_id") else None,
        reasoning=message.reasoning if message.HasField("reasoning") else None,
    )


def chat_context(request: inference_pb2.ChatRequest) -> ChatContext:
    tools = tuple(_tool(i, tool) for i, tool in enumerate(request.tools))
    if request.HasField("tool_choice"):
        mode = _known(_TOOL_CHOICE, request.tool_choice.mode, "tool_choice.mode")
        name = request.tool_choice.name or None
        if (mode is ToolChoiceMode.NAMED) != (name is not None):
            raise errors.InvalidRequest(
                "tool_choice names a function exactly when it is of type function",
                param="tool_choice",
            )
        choice = ToolChoice(mode, name)
    else:
        choice = ToolChoice(ToolChoiceMode.AUTO if tools else ToolChoiceMode.NONE)
    kwargs = (
        _json_object(request.chat_template_kwargs_json, "chat_template_kwargs")
        if request.HasField("chat_template_kwargs_json")
        else {}
    )
    return ChatContext(
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=(
            request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
        ),
        reasoning_effort=request.reasoning_effort if request.HasField("reasoning_effort") else None,
        template_kwargs=kwargs,
        include_reasoning=(
            request.include_reasoning if request.HasField("include_reasoning") else True
        ),
    )


def _tool(index: int, tool: inference_pb2.Tool) -> Tool:
    param = f"tools[{index}].function.parameters"
    parameters = (
        _json_object(tool.parameters_json, param) if tool.HasField("parameters_json") else None
    )
    return Tool(
        name=tool.name,
        description=tool.description if tool.HasField("description") else None,
        parameters=parameters,
        strict=tool.strict,
    )


def sampling_of(sampling: inference_pb2.Sampling, *, has_max_tokens: bool) -> Sampling:
    """Validates the sampling fields' ranges; the engine checks the rest (see module doc)."""
    if sampling.ignore_eos and not has_max_tokens:
        raise errors.InvalidRequest("ignore_eos needs max_tokens", param="ignore_eos")
    top_p = _optional_range(sampling, "top_p", 0.0, 1.0)
    if top_p is not None and top_p == 0.0:
        raise errors.InvalidRequest("top_p must be greater than 0", param="top_p")
    if len(sampling.stop) > MAX_STOP:
        raise errors.InvalidRequest(f"stop may hold at most {MAX_STOP} strings", param="stop")
    if any(not s for s in sampling.stop):
        raise errors.InvalidRequest("stop strings must not be empty", param="stop")
    repetition = _optional_range(sampling, "repetition_penalty", 0.0, math.inf)
    if repetition is not None and repetition == 0.0:
        raise errors.InvalidRequest(
            "repetition_penalty must be greater than 0", param="repetition_penalty"
        )
    top_k = sampling.top_k if sampling.HasField("top_k") else None
    if top_k is not None and (top_k == 0 or top_k < -1):
        raise errors.InvalidRequest("top_k must be -1 (all) or at least 1", param="top_k")
    # Before admission, which holds the request's tokens for each of its n choices.
    n = sampling.n if sampling.HasField("n") else 1
    if not 1 <= n <= MAX_CHOICES:
        raise errors.InvalidRequest(f"n must be between 1 and {MAX_CHOICES}.", param="n")
    return Sampling(
        temperature=_optional_range(sampling, "temperature", 0.0, 2.0),
        top_p=top_p,
        stop=tuple(sampling.stop),
        seed=sampling.seed if sampling.HasField("seed") else None,
        presence_penalty=_optional_range(sampling, "presence_penalty", -2.0, 2.0),
        frequency_penalty=_optional_range(sampling, "frequency_penalty", -2.0, 2.0),
        ignore_eos=sampling.ignore_eos,
        n=n,
        top_k=None if top_k in (None, -1) else top_k,
        min_p=_optional_range(sampling, "min_p", 0.0, 1.0),
        repetition_penalty=repetition,
        stop_token_ids=tuple(sampling.stop_token_ids),
        include_stop_str_in_output=sampling.include_stop_str_in_output,
        logit_bias=dict(sampling.logit_bias),
        logprobs=sampling.logprobs if sampling.HasField("logprobs") else None,
        prompt_logprobs=sampling.prompt_logprobs if sampling.HasField("prompt_logprobs") else None,
        response_format=_response_format(sampling),
    )


def _response_format(sampling: inference_pb2.Sampling) -> ResponseFormat:
    if not sampling.HasField("response_format"):
        return ResponseFormat()
    wire = sampling.response_format
    kind = _known(_RESPONSE_FORMAT, wire.type, "response_format.type")
    if kind is not ResponseFormatType.JSON_SCHEMA:
        return ResponseFormat(type=kind)
    schema = _json_object(wire.schema_json, "response_format.json_schema.schema")
    return ResponseFormat(type=kind, schema=schema, name=wire.name or None, strict=wire.strict)


T = TypeVar("T")


def _known(values: Mapping[Any, T], number: int, param: str) -> T:
    """The domain value of a wire enum; a number this core does not know (proto3 enums are
    open: a client built from a newer proto may send one) is the caller's error."""
    value = values.get(number)
    if value is None:
        raise errors.InvalidRequest(
            f"{param} {number} is not a value this server knows", param=param
        )
    return value


def _json_object(text: str, param: str) -> dict[str, Any]:
    if len(text) > MAX_JSON_CHARS:
        raise errors.InvalidRequest(
            f"{param} may be at most {MAX_JSON_CHARS} characters of JSON", param=param
        )
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise errors.InvalidRequest(f"{param} is not valid JSON", param=param) from None
    if not isinstance(value, dict):
        raise errors.InvalidRequest(f"{param} must be a JSON object", param=param)
    return value


def _optional_range(message: Any, field: str, low: float, high: float) -> float | None:
    if not message.HasField(field):
        return None
    value = float(getattr(message, field))
    if math.isnan(value) or not low <= value <= high:
        bounds = f"between {low:g} and {high:g}" if math.isfinite(high) else f"at least {low:g}"
        raise errors.InvalidRequest(f"{field} must be {bounds}", param=field)
    return value


# ---- domain → wire ---------------------------------------------------------------------------


def chunk(delta: Delta) -> inference_pb2.ChatChunk:
    """One ChatChunk for one choice's delta (the usage is set by the caller on the last)."""
    # Fields left at their defaults are not passed: each keyword costs, and this is every
    # streamed token's path.
    message = inference_pb2.ChatChunk(text=delta.text, completion_tokens=delta.num_tokens)
    if delta.index:
        message.index = delta.index
    if delta.reasoning:
        message.reasoning = delta.reasoning
    if delta.finish_reason is not None:
        message.finish_reason = _FINISH[delta.finish_reason]
    for piece in delta.tool_calls:
        wire = message.tool_calls.add(index=piece.index, arguments=piece.arguments)
        if piece.id is not None:
            wire.id = piece.id
        if piece.name is not None:
            wire.name = piece.name
    if delta.logprobs:
        message.logprobs.extend(logprob(lp) for lp in delta.logprobs)
    if delta.prompt_logprobs:
        message.prompt_logprobs.extend(logprob(lp) for lp in delta.prompt_logprobs)
    if isinstance(delta.stop_reason, str):
        message.stop_string = delta.stop_reason
    elif isinstance(delta.stop_reason, int):
        message.stop_token_id = delta.stop_reason
    return message


def logprob(token: TokenLogprob) -> inference_pb2.TokenLogprob:
    wire = inference_pb2.TokenLogprob(token_id=token.token_id, token=token.token)
    if token.logprob is not None:
        wire.logprob = token.logprob
    for top in token.top:
        wire.top.add(token_id=top.token_id, token=top.token, logprob=top.logprob)
    return wire


def usage(
    charge: Charged | None, rate_card_version: str, reasoning_tokens: int = 0
) -> inference_pb2.Usage:
    if charge is None:
        return inference_pb2.Usage(rate_card_version=rate_card_version)
    return inference_pb2.Usage(
        prompt_tokens=charge.prompt_tokens,
        completion_tokens=charge.completion_tokens,
        total_tokens=charge.prompt_tokens + charge.completion_tokens,
        cached_prompt_tokens=charge.cached_prompt_tokens,
        cost_nano_usd=charge.cost_nano,
        rate_card_version=charge.rate_card_version,
        reasoning_tokens=min(reasoning_tokens, charge.completion_tokens),
    )
