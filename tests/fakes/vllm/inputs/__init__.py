"""vllm/inputs: the prompt schemas the adapter builds (defined in vllm/inputs/llm.py)."""

from typing import NotRequired, TypedDict


class TextPrompt(TypedDict):
    """Schema for a text prompt."""

    prompt: str
    cache_salt: NotRequired[str]


class TokensPrompt(TypedDict):
    """Schema for a tokenized prompt."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    token_type_ids: NotRequired[list[int]]
    cache_salt: NotRequired[str]


__all__ = ["TextPrompt", "TokensPrompt"]
