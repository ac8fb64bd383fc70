"""vllm/tokenizers: the tokenizer protocol the adapter relies on (vllm/tokenizers/protocol.py)."""

from typing import Any, Protocol


class TokenizerLike(Protocol):
    def encode(
        self,
        text: str,
        truncation: bool | None = None,
        max_length: int | None = None,
        add_special_tokens: bool = True,
    ) -> list[int]:
        raise NotImplementedError

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int] | int, skip_special_tokens: bool = False) -> str:
        raise NotImplementedError


__all__ = ["TokenizerLike"]
