"""OpenAI's REST request types, decoded straight from the request body with msgspec.

Only what the edge accepts is declared; unknown fields are ignored (and logged at debug by
`gateway.decoding`). Type errors become 400s naming the field. Responses are built where they
are sent, since their shapes are fixed.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class TextPart(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class Message(msgspec.Struct):
    role: str
    # A string, a list of text parts, or null (an assistant turn without text).
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM's extension: keep generating to max_tokens (used by benchmarks).
    ignore_eos: bool = False


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: str
    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    input: str | list[str | int | list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
embedding_decoder = msgspec.json.Decoder(EmbeddingRequest)
