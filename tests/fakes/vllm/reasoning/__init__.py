"""vllm/reasoning: the registry of reasoning parsers, by name (the fake has one)."""

from typing import ClassVar


class ReasoningParserManager:
    reasoning_parsers: ClassVar[dict[str, type]] = {}

    @classmethod
    def list_registered(cls) -> list[str]:
        from vllm.parser.abstract_parser import ThinkReasoningParser

        cls.reasoning_parsers.setdefault("qwen3", ThinkReasoningParser)
        return sorted(cls.reasoning_parsers)

    @classmethod
    def get_reasoning_parser(cls, name: str) -> type:
        if name not in cls.list_registered():
            raise KeyError(f"reasoning parser: '{name}' not found in reasoning_parsers")
        return cls.reasoning_parsers[name]
