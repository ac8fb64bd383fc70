"""The vLLM adapter's translations, without vllm: seam types to the fields of vLLM's own OpenAI
request objects, and vLLM's outputs (logprobs, parsed deltas) back to seam types.

The adapter fills vLLM's `ChatCompletionRequest` / `CompletionRequest` with these fields and lets
vLLM do the rest as `vllm serve` does (its `to_sampling_params`, its parsers' `adjust_request`,
its `ChatStreamProcessor`), so sampling defaults, structured outputs and tool parsing are vLLM's
own. Every field name used here is listed in vllm_contract.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from corvex_core.engines.base import (
    ChatContext,
    ChatMessage,
    FinishReason,
    ResponseFormat,
    ResponseFormatType,
    SamplingOptions,
    TokenLogprob,
    Tool,
    ToolCallDelta,
    ToolChoiceMode,
    TopLogprob,
)

_FINISH_REASONS: Final = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
    "abort": FinishReason.ABORT,
    # The model stopped on a repetition it was asked to detect. The adapter never asks
    # (repetition_detection), but the output is a normal end if it happens.
    "repetition": FinishReason.STOP,
}

# Template variables the adapter passes itself, so a template's kwargs never repeat them.
_OWN_TEMPLATE_ARGUMENTS: Final = ("add_generation_prompt", "continue_final_message", "tokenize")


def finish_reason(reason: str | None) -> FinishReason | None:
    """The seam's finish reason for vLLM's string; None for one the seam does not know."""
    return _FINISH_REASONS.get(str(reason))


def message_dict(message: ChatMessage) -> dict[str, Any]:
    """A message as OpenAI sends it, which is what vLLM's ChatCompletionRequest validates."""
    rendered: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name is not None:
        rendered["name"] = message.name
    if message.tool_calls:
        rendered["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    if message.reasoning is not None:
        rendered["reasoning"] = message.reasoning
    return rendered


def template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates take it (vLLM's renderers/chat_utils rules): tool-call
    arguments as objects (an unparsable or non-object one as {}), reasoning under both names."""
    rendered = message_dict(message)
    for call in rendered.get("tool_calls", ()):
        function = call["function"]
        try:
            arguments = json.loads(function["arguments"]) if function["arguments"] else {}
        except json.JSONDecodeError:
            arguments = {}
        function["arguments"] = arguments if isinstance(arguments, dict) else {}
    if message.reasoning is not None:
        rendered["reasoning_content"] = message.reasoning
    return rendered


def tool_dict(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.parameters is not None:
        function["parameters"] = tool.parameters
    if tool.strict:
        function["strict"] = True
    return {"type": "function", "function": function}


def _tool_choice(context: ChatContext) -> str | dict[str, Any]:
    choice = context.tool_choice
    if choice.mode is ToolChoiceMode.NAMED:
        return {"type": "function", "function": {"name": choice.name}}
    return str(choice.mode.value)


def response_format_dict(response_format: ResponseFormat) -> dict[str, Any] | None:
    kind = response_format.type
    if kind is ResponseFormatType.TEXT:
        return None
    if kind is ResponseFormatType.JSON_OBJECT:
        return {"type": "json_object"}
    json_schema: dict[str, Any] = {
        "name": response_format.name or "response",
        "schema": response_format.schema,
        "strict": response_format.strict,
    }
    return {"type": "json_schema", "json_schema": json_schema}


def request_fields(options: SamplingOptions) -> dict[str, Any]:
    """Fields shared by vLLM's chat and completion requests. None leaves vLLM's default (the
    model's generation config, then OpenAI's), which its `to_sampling_params` applies."""
    return {
        "n": options.n,
        "temperature": options.temperature,
        "top_p": options.top_p,
        "top_k": options.top_k,
        "min_p": options.min_p,
        "repetition_penalty": options.repetition_penalty,
        "presence_penalty": options.presence_penalty,
        "frequency_penalty": options.frequency_penalty,
        "seed": options.seed,
        "stop": list(options.stop),
        "stop_token_ids": list(options.stop_token_ids),
        "include_stop_str_in_output": options.include_stop_str_in_output,
        "ignore_eos": options.ignore_eos,
        # OpenAI's JSON keys are strings; vLLM's request types them so.
        "logit_bias": {str(k): v for k, v in options.logit_bias.items()} or None,
        "response_format": response_format_dict(options.response_format),
        # DELTA outputs, a non-streaming answer's too (the core folds them): vLLM's tool and
        # reasoning parsers read deltas, and a request cut short is charged the tokens it
        # produced, which only outputs delivered as they come tell (not FINAL_ONLY). vLLM's
        # request objects refuse prompt_logprobs with stream (its OpenAI server cannot stream
        # them); its engine returns them on the first DELTA output, so `sampling_params` sets
        # them on the SamplingParams instead.
        "stream": True,
    }


def sampling_params(request: Any, options: SamplingOptions, defaults: Mapping[str, Any]) -> Any:
    """vLLM's own `to_sampling_params` of a request built from `request_fields`, with the
    prompt's logprobs asked of the engine (see request_fields)."""
    params = request.to_sampling_params(options.max_tokens, defaults)
    if options.prompt_logprobs is not None:
        params.prompt_logprobs = options.prompt_logprobs
    return params


def chat_request_fields(
    messages: Sequence[Mapping[str, Any]], context: ChatContext, options: SamplingOptions
) -> dict[str, Any]:
    """The fields of vLLM's ChatCompletionRequest for one chat request."""
    fields = request_fields(options)
    fields.update(
        messages=list(messages),
        tools=[tool_dict(t) for t in context.tools] or None,
        tool_choice=_tool_choice(context) if context.tools else "none",
        parallel_tool_calls=context.parallel_tool_calls,
        reasoning_effort=context.reasoning_effort,
        chat_template_kwargs=dict(context.template_kwargs) or None,
        include_reasoning=context.include_reasoning,
        logprobs=options.logprobs is not None,
        top_logprobs=options.logprobs or 0,
    )
    return fields


def completion_request_fields(token_ids: Sequence[int], options: SamplingOptions) -> dict[str, Any]:
    """The fields of vLLM's CompletionRequest for a prompt of token ids."""
    fields = request_fields(options)
    # Echo is the edge's framing (it has the prompt's text); its logprobs are prompt_logprobs.
    fields.update(prompt=list(token_ids), echo=False, logprobs=options.logprobs)
    return fields


def template_kwargs(chat_params_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM's resolved template variables, less the arguments the adapter passes itself."""
    return {k: v for k, v in chat_params_kwargs.items() if k not in _OWN_TEMPLATE_ARGUMENTS}


def tool_call_deltas(tool_calls: Sequence[Any] | None) -> tuple[ToolCallDelta, ...]:
    """vLLM's DeltaToolCall list as the seam's pieces (id and name only on a call's first)."""
    if not tool_calls:
        return ()
    pieces = []
    for call in tool_calls:
        function = call.function
        pieces.append(
            ToolCallDelta(
                index=int(call.index),
                id=call.id,
                name=None if function is None else function.name,
                arguments="" if function is None else function.arguments or "",
            )
        )
    return tuple(pieces)


def _candidates(position: Mapping[int, Any], decode: Any) -> list[TopLogprob]:
    """One position's candidates, most likely first (vLLM's rank; the logprob breaks ties)."""
    entries = [
        TopLogprob(
            token_id=int(token),
            token=logprob.decoded_token if logprob.decoded_token is not None else decode(token),
            logprob=max(float(logprob.logprob), -9999.0),
        )
        for token, logprob in position.items()
    ]
    ranks = {int(t): (lp.rank if lp.rank is not None else 1 << 30) for t, lp in position.items()}
    entries.sort(key=lambda e: (ranks[e.token_id], -e.logprob))
    return entries


def token_logprobs(
    token_ids: Sequence[int], positions: Sequence[Mapping[int, Any] | None], k: int, decode: Any
) -> tuple[TokenLogprob, ...]:
    """vLLM's per-token logprob dicts (sampled token and its top k) as the seam's entries.

    `top` is OpenAI's: the k most likely candidates in order (vLLM's own chat server lists the
    sampled token first instead, which differs when a sampled token was not the most likely).
    """
    result = []
    for token, position in zip(token_ids, positions, strict=True):
        if position is None or token not in position:
            result.append(TokenLogprob(token_id=int(token), token=decode(token), logprob=None))
            continue
        candidates = _candidates(position, decode)
        own = next(c for c in candidates if c.token_id == token)
        result.append(
            TokenLogprob(
                token_id=own.token_id,
                token=own.token,
                logprob=own.logprob,
                top=tuple(candidates[:k]),
            )
        )
    return tuple(result)
