"""vllm/renderers: ChatParams and merge_kwargs (renderers/params.py), as the adapter uses them."""

from dataclasses import dataclass, field
from typing import Any


def merge_kwargs(
    defaults: dict[str, Any] | None,
    overrides: dict[str, Any] | None,
    /,
    *,
    unset_values: tuple[object, ...] = (None, "auto"),
) -> dict[str, Any]:
    return (defaults or {}) | {k: v for k, v in (overrides or {}).items() if v not in unset_values}


@dataclass
class ChatParams:
    chat_template: str | None = None
    chat_template_content_format: str = "auto"
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def with_defaults(
        self,
        default_chat_template_kwargs: dict[str, Any] | None = None,
        default_media_io_kwargs: dict[str, dict[str, Any]] | None = None,
        default_mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> "ChatParams":
        if not default_chat_template_kwargs:
            return self
        return ChatParams(
            chat_template=self.chat_template,
            chat_template_content_format=self.chat_template_content_format,
            chat_template_kwargs=merge_kwargs(
                default_chat_template_kwargs, self.chat_template_kwargs
            ),
        )


__all__ = ["ChatParams", "merge_kwargs"]
