"""Server-sent events of a streamed chat completion, framed exactly as OpenAI frames them.

A first chunk with the role, content chunks, a chunk with the finish_reason and an empty delta,
then (with include_usage) one chunk with `choices: []` and the usage, then `data: [DONE]`. An
error after the response has started is one `data: {"error": ...}` event (the OpenAI SDKs raise
an APIError for it); this module is the only place any of these bytes are written.
"""

from __future__ import annotations

from typing import Final

import msgspec

from corvex.v1 import inference_pb2
from gateway.errors import ApiError
from gateway.usage import usage_json

CONTENT_TYPE: Final = "text/event-stream; charset=utf-8"
DONE: Final = b"data: [DONE]\n\n"
_encoder = msgspec.json.Encoder()


def error_event(error: ApiError) -> bytes:
    """The event that ends a stream whose status line has already been sent."""
    return b"data: " + error.encode() + b"\n\n"


class ChunkFramer:
    """Pre-encodes what every chunk of one stream shares, so a token costs one string encode."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        head = _encoder.encode(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
            }
        )[:-1]
        usage = b',"usage":null' if include_usage else b""
        self._content_head = b"data: " + head + b',"choices":[{"index":0,"delta":{"content":'
        self._content_tail = b'},"logprobs":null,"finish_reason":null}]' + usage + b"}\n\n"
        self._head = b"data: " + head
        self._usage_tail = usage

    def role(self) -> bytes:
        return (
            self._head
            + b',"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
            + b'"logprobs":null,"finish_reason":null}]'
            + self._usage_tail
            + b"}\n\n"
        )

    def content(self, text: str) -> bytes:
        return self._content_head + _encoder.encode(text) + self._content_tail

    def finish(self, reason: str) -> bytes:
        return (
            self._head
            + b',"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":'
            + _encoder.encode(reason)
            + b"}]"
            + self._usage_tail
            + b"}\n\n"
        )

    def usage(self, usage: inference_pb2.Usage) -> bytes:
        return (
            self._head + b',"choices":[],"usage":' + _encoder.encode(usage_json(usage)) + b"}\n\n"
        )
