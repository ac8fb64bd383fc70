"""SSE framing of a streamed chat completion: OpenAI's chunk shapes, byte for byte where the
SDKs parse them, and the one `error` event a started stream can end with."""

from __future__ import annotations

import json
from typing import Any

from corvex.v1 import inference_pb2
from gateway import sse
from gateway.errors import ApiError


def event(data: bytes) -> Any:
    assert data.startswith(b"data: ") and data.endswith(b"\n\n")
    return json.loads(data.removeprefix(b"data: "))


HEAD = {
    "id": "chatcmpl-r1",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "m/m",
    "system_fingerprint": None,
}


def test_chunks_have_openais_shape_with_usage_null_until_the_usage_chunk() -> None:
    framer = sse.ChunkFramer("chatcmpl-r1", 1700000000, "m/m", include_usage=True)
    assert event(framer.role()) == {
        **HEAD,
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": "", "refusal": None},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "usage": None,
    }
    assert event(framer.content('say "hi"\n')) == {
        **HEAD,
        "choices": [
            {
                "index": 0,
                "delta": {"content": 'say "hi"\n'},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "usage": None,
    }
    assert event(framer.finish("length")) == {
        **HEAD,
        "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}],
        "usage": None,
    }
    usage = inference_pb2.Usage(
        prompt_tokens=11, completion_tokens=3, total_tokens=14, cost_nano_usd=8050
    )
    usage.rate_card_version = "v1"
    assert event(framer.usage(usage)) == {
        **HEAD,
        "choices": [],
        "usage": {
            "prompt_tokens": 11,
            "completion_tokens": 3,
            "total_tokens": 14,
            "prompt_tokens_details": {"cached_tokens": 0},
            "cost": "0.00000805",
            "rate_card_version": "v1",
        },
    }


def test_without_include_usage_chunks_carry_no_usage_field() -> None:
    framer = sse.ChunkFramer("chatcmpl-r1", 1700000000, "m/m", include_usage=False)
    for data in (framer.role(), framer.content("x"), framer.finish("stop")):
        assert "usage" not in event(data)
    assert sse.DONE == b"data: [DONE]\n\n"


def test_an_error_is_one_event_with_the_openai_error_body() -> None:
    data = sse.error_event(ApiError(503, "The engine stopped; retry shortly."))
    assert event(data) == {
        "error": {
            "message": "The engine stopped; retry shortly.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
