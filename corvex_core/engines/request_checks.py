"""The checks every engine runs on what a request asks, before it renders or generates.

Bounds from base.py (n, logprobs, logit_bias, stop_token_ids, tools, template variables), token
ids against the engine's vocabulary, schemas (valid and within size), and the tool choice
against the tools given. Each failure is an EngineRequestError whose `param` is the OpenAI
request field, so the client gets a 400 naming it. Engine-specific limits (what the simulated
engine can generate, what vLLM's backends accept) are checked by the engines themselves.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Final

from corvex_core.engines.base import (
    MAX_CHOICES,
    MAX_LOGIT_BIAS,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPLATE_KWARGS,
    MAX_TOOL_NAME_CHARS,
    MAX_TOOLS,
    MAX_TOP_LOGPROBS,
    ChatContext,
    EngineRequestError,
    ResponseFormatType,
    SamplingOptions,
    ToolChoiceMode,
)
from corvex_core.engines.json_schema import SchemaError, check_schema

_TOOL_NAME: Final = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_TOOL_NAME_CHARS}}}")


def check_options(options: SamplingOptions, vocab_size: int) -> None:
    """Raises EngineRequestError for options outside the seam's bounds or the vocabulary."""
    if not 1 <= options.n <= MAX_CHOICES:
        raise EngineRequestError(f"n must be between 1 and {MAX_CHOICES}.", param="n")
    if options.max_tokens < 1:
        raise EngineRequestError("max_tokens must be at least 1.", param="max_tokens")
    for name, value in (("top_logprobs", options.logprobs), ("logprobs", options.prompt_logprobs)):
        if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
            raise EngineRequestError(
                f"{name} must be between 0 and {MAX_TOP_LOGPROBS}.", param=name
            )
    _check_logit_bias(options.logit_bias, vocab_size)
    if len(options.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise EngineRequestError(
            f"stop_token_ids may name at most {MAX_STOP_TOKEN_IDS} tokens.",
            param="stop_token_ids",
        )
    check_token_ids(options.stop_token_ids, vocab_size, "stop_token_ids")
    response_format = options.response_format
    if response_format.type is ResponseFormatType.JSON_SCHEMA:
        if response_format.schema is None:
            raise EngineRequestError(
                "response_format of type json_schema needs json_schema.schema.",
                param="response_format",
            )
        _check_schema(response_format.schema, "response_format")


def _check_logit_bias(logit_bias: dict[int, float], vocab_size: int) -> None:
    if len(logit_bias) > MAX_LOGIT_BIAS:
        raise EngineRequestError(
            f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens.", param="logit_bias"
        )
    check_token_ids(logit_bias, vocab_size, "logit_bias")
    for token_id, bias in logit_bias.items():
        if not (math.isfinite(bias) and -100 <= bias <= 100):
            raise EngineRequestError(
                f"logit_bias of token {token_id} must be between -100 and 100, not {bias}.",
                param="logit_bias",
            )


def check_token_ids(token_ids: Iterable[int], vocab_size: int, param: str) -> None:
    """Raises EngineRequestError for a token id outside 0 .. vocab_size - 1."""
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise EngineRequestError(
                f"token id {token_id} is outside the model's vocabulary (0 to {vocab_size - 1}).",
                param=param,
            )


def check_chat_context(context: ChatContext) -> None:
    """Raises EngineRequestError for tools, a tool choice or template variables out of bounds."""
    tools = context.tools
    if len(tools) > MAX_TOOLS:
        raise EngineRequestError(f"tools may hold at most {MAX_TOOLS} functions.", param="tools")
    names: set[str] = set()
    for tool in tools:
        if not _TOOL_NAME.fullmatch(tool.name):
            raise EngineRequestError(
                f"The function name {tool.name!r} must be 1 to {MAX_TOOL_NAME_CHARS} letters, "
                "digits, underscores or dashes.",
                param="tools",
            )
        if tool.name in names:
            raise EngineRequestError(f"The function {tool.name!r} is defined twice.", param="tools")
        names.add(tool.name)
        if tool.parameters is not None:
            _check_schema(tool.parameters, "tools")
    choice = context.tool_choice
    if choice.mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.NAMED) and not tools:
        raise EngineRequestError(
            f"tool_choice {choice.mode.value!r} needs tools to choose from.", param="tool_choice"
        )
    if choice.mode is ToolChoiceMode.NAMED and choice.name not in names:
        raise EngineRequestError(
            f"tool_choice names the function {choice.name!r}, which is not in tools.",
            param="tool_choice",
        )
    if len(context.template_kwargs) > MAX_TEMPLATE_KWARGS:
        raise EngineRequestError(
            f"chat_template_kwargs may hold at most {MAX_TEMPLATE_KWARGS} entries.",
            param="chat_template_kwargs",
        )


def _check_schema(schema: object, param: str) -> None:
    try:
        check_schema(schema)
    except SchemaError as exc:
        raise EngineRequestError(str(exc), param=param) from exc
