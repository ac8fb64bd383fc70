"""OpenAI's REST request types, decoded straight from the request body with msgspec.

Only what the edge accepts is declared; unknown fields are ignored (and logged at debug by
`gateway.decoding`). Type errors become 400s naming the field. Text that the core may quote back
in an error (a model id, a role) is bounded here, so nothing unbounded is forwarded. Responses
are built where they are sent, since their shapes are fixed.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from corvex.model_ids import MAX_MODEL_ID_CHARS

# OpenAI's roles are single words ("system", "developer", "user", "assistant", "tool"); the
# core decides which it serves, the edge only refuses what cannot be a role.
MAX_ROLE_CHARS: Final = 32

ModelId = Annotated[str, msgspec.Meta(max_length=MAX_MODEL_ID_CHARS)]
Role = Annotated[str, msgspec.Meta(max_length=MAX_ROLE_CHARS)]


class TextPart(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class Message(msgspec.Struct):
    role: Role
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
    model: ModelId
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
    model: ModelId
    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    input: str | list[str | int | list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
embedding_decoder = msgspec.json.Decoder(EmbeddingRequest)
