"""vllm/tool_parsers: the registry of tool-call parsers, by name (the fake has one)."""

from typing import ClassVar


class ToolParserManager:
    tool_parsers: ClassVar[dict[str, type]] = {}

    @classmethod
    def list_registered(cls) -> list[str]:
        from vllm.parser.abstract_parser import HermesToolParser

        cls.tool_parsers.setdefault("hermes", HermesToolParser)
        return sorted(cls.tool_parsers)

    @classmethod
    def get_tool_parser(cls, name: str) -> type:
        if name not in cls.list_registered():
            raise KeyError(f"tool helper: '{name}' not found in tool_parsers")
        return cls.tool_parsers[name]
