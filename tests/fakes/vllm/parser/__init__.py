"""vllm/parser: the unified Parser and ParserManager (parser_manager.py)."""

from typing import Any

from vllm.parser.abstract_parser import DelegatingParser, Parser
from vllm.reasoning import ReasoningParserManager
from vllm.tool_parsers import ToolParserManager


class ParserManager:
    @classmethod
    def get_parser(
        cls,
        tool_parser_name: str | None = None,
        reasoning_parser_name: str | None = None,
        enable_auto_tools: bool = False,
        model_name: str | None = None,
        is_harmony: bool = False,
        tool_strict_level: str | None = None,
        tokenizer: Any = None,
    ) -> type[Parser] | None:
        """A Parser class composing the named parsers; None if neither is named."""
        if not tool_parser_name and not reasoning_parser_name:
            return None
        reasoning_cls = None
        if reasoning_parser_name:
            try:
                reasoning_cls = ReasoningParserManager.get_reasoning_parser(reasoning_parser_name)
            except Exception as e:
                raise TypeError(f"{reasoning_parser_name=} has not been registered") from e
        tool_cls = None
        if enable_auto_tools and tool_parser_name:
            try:
                tool_cls = ToolParserManager.get_tool_parser(tool_parser_name)
            except Exception as e:
                raise TypeError(
                    "Error: --enable-auto-tool-choice requires "
                    f"tool_parser:'{tool_parser_name}' which has not been registered"
                ) from e
        if reasoning_cls is None and tool_cls is None:
            return None
        return type(
            "_Parser",
            (DelegatingParser,),
            {"reasoning_parser_cls": reasoning_cls, "tool_parser_cls": tool_cls},
        )


__all__ = ["DelegatingParser", "Parser", "ParserManager"]
