"""vllm/parser/abstract_parser.py: `Parser`, one per request (and per choice while streaming),
splitting a model's output into reasoning, content and tool calls.

Kept from vLLM: the class attributes and methods the serving layer calls (adjust_request turning
a required or named tool choice into structured output, set_prompt_token_ids, is_reasoning_end,
parse_delta, count_reasoning_tokens). Fake-only: the formats are the toy model's words, Hermes
style (`<tool_call> {"name": ..., "arguments": ...} </tool_call>`) and `<think> ... </think>`.
"""

import json
from collections.abc import Sequence
from typing import Any

from vllm.entrypoints.generate.base.protocol import DeltaFunctionCall, DeltaMessage, DeltaToolCall
from vllm.sampling_params import StructuredOutputsParams


class ThinkReasoningParser:
    """Stands for a ReasoningParser whose model thinks between <think> and </think>."""

    start, end = "<think>", "</think>"

    def __init__(self, tokenizer: Any, *args: Any, **kwargs: Any) -> None:
        self.model_tokenizer = tokenizer


class HermesToolParser:
    """Stands for Hermes2ProToolParser: calls as JSON between <tool_call> and </tool_call>."""

    start, end = "<tool_call>", "</tool_call>"
    supports_required_and_named = True

    def __init__(self, tokenizer: Any, tools: list[Any] | None = None) -> None:
        self.model_tokenizer = tokenizer
        self.tools = list(tools or [])


def _tool_schema(request: Any) -> dict[str, Any] | None:
    """get_json_schema_from_tools: the JSON a forced or required tool choice must produce."""
    choice = request.tool_choice
    if not isinstance(choice, str):
        tool = next(t for t in request.tools if t.function.name == choice.function.name)
        return tool.function.parameters or {"type": "object", "properties": {}}
    if choice != "required":
        return None
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t.function.name]},
                "parameters": t.function.parameters or {"type": "object", "properties": {}},
            },
            "required": ["name", "parameters"],
        }
        for t in request.tools
    ]
    return {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": options}}


class Parser:
    reasoning_parser_cls: type | None = None
    tool_parser_cls: type | None = None
    tool_strict_level: Any = None
    always_adjust_request: bool = False

    def __init__(
        self,
        tokenizer: Any,
        tools: list[Any] | None = None,
        *args: Any,
        model_config: Any = None,
        **kwargs: Any,
    ) -> None:
        self.model_tokenizer = tokenizer
        cls = type(self)
        self._reasoning_parser = (
            cls.reasoning_parser_cls(tokenizer) if cls.reasoning_parser_cls else None
        )
        self._tool_parser = cls.tool_parser_cls(tokenizer, tools) if cls.tool_parser_cls else None
        self._reasoning = self._reasoning_parser is not None
        self._in_call = False
        self._call_text = ""
        self._json_text = ""
        self._calls = 0

    @property
    def reasoning_parser(self) -> Any:
        return self._reasoning_parser

    @property
    def tool_parser(self) -> Any:
        return self._tool_parser

    def adjust_request(self, request: Any) -> Any:
        if self._tool_parser is None or not request.tools:
            return request
        schema = _tool_schema(request)
        if schema is not None:
            request.structured_outputs = StructuredOutputsParams(json=schema)
            request.response_format = None
        return request

    def set_prompt_token_ids(self, prompt_token_ids: Sequence[int]) -> None:
        return

    def is_reasoning_end(self, input_ids: list[int]) -> bool:
        return False  # the toy template never closes a <think> in the prompt

    def count_reasoning_tokens(self, token_ids: Sequence[int]) -> int:
        if self._reasoning_parser is None:
            return 0
        words = [self.model_tokenizer.decode(i).strip() for i in token_ids]
        if ThinkReasoningParser.start not in words:
            return 0
        start = words.index(ThinkReasoningParser.start) + 1
        end = (
            words.index(ThinkReasoningParser.end)
            if ThinkReasoningParser.end in words
            else len(words)
        )
        return max(end - start, 0)

    def parse_delta(
        self,
        delta_text: str,
        delta_token_ids: list[int],
        request: Any,
        prompt_token_ids: list[int] | None = None,
        *,
        finished: bool,
    ) -> DeltaMessage | None:
        content, reasoning, calls = "", "", []
        choice = request.tool_choice
        forced = (
            self._tool_parser is not None
            and request.tools
            and (choice == "required" or not isinstance(choice, str))
        )
        for word in delta_text.split():
            if self._reasoning:
                if word == ThinkReasoningParser.end:
                    self._reasoning = False
                elif word != ThinkReasoningParser.start:
                    reasoning += " " + word
            elif forced:
                self._json_text += " " + word
            elif self._tool_parser is not None and word == HermesToolParser.start:
                self._in_call, self._call_text = True, ""
            elif self._in_call and word == HermesToolParser.end:
                self._in_call = False
                call = json.loads(self._call_text)
                calls.append(self._call(call["name"], call.get("arguments", {})))
            elif self._in_call:
                self._call_text += " " + word
            else:
                content += " " + word
        if finished and forced and self._json_text.strip():
            if isinstance(choice, str):
                calls += [
                    self._call(c["name"], c["parameters"]) for c in json.loads(self._json_text)
                ]
            else:
                calls.append(self._call(choice.function.name, json.loads(self._json_text)))
        if not (content or reasoning or calls):
            return None
        return DeltaMessage(content=content or None, reasoning=reasoning or None, tool_calls=calls)

    def _call(self, name: str, arguments: Any) -> DeltaToolCall:
        index, self._calls = self._calls, self._calls + 1
        return DeltaToolCall(
            index=index,
            id=f"chatcmpl-tool-{index}",
            type="function",
            function=DeltaFunctionCall(name=name, arguments=json.dumps(arguments)),
        )


class DelegatingParser(Parser):
    """What ParserManager composes for a reasoning parser and a tool parser."""
