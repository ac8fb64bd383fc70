"""SSE framing of streamed chat and text completions: OpenAI's chunk shapes, byte for byte where
the SDKs parse them (role first, tool calls' heads then argument fragments, choices in index
order, usage null until the usage chunk), vLLM's continuous usage, and the one `error` event a
started stream can end with."""

from __future__ import annotations

import json
from typing import Any

from corvex.v1 import inference_pb2
from gateway import sse
from gateway.errors import ApiError


def event(data: bytes) -> Any:
    assert data.startswith(b"data: ") and data.endswith(b"\n\n")
    return json.loads(data.removeprefix(b"data: "))


def events(data: list[bytes]) -> list[Any]:
    return [event(d) for d in data]


HEAD = {
    "id": "chatcmpl-r1",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "m/m",
    "system_fingerprint": None,
}


def chat_framer(**options: bool) -> sse.ChatFramer:
    return sse.ChatFramer("chatcmpl-r1", 1700000000, "m/m", **options)


def chunk(**fields: Any) -> inference_pb2.ChatChunk:
    return inference_pb2.ChatChunk(**fields)


def choice(index: int, delta: dict[str, Any], **rest: Any) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None, **rest}


USAGE = inference_pb2.Usage(
    prompt_tokens=11, completion_tokens=3, total_tokens=14, cost_nano_usd=8050
)
USAGE.rate_card_version = "v1"


def test_chunks_have_openais_shape_with_usage_null_until_the_usage_chunk() -> None:
    framer = chat_framer(include_usage=True)
    first = framer.chunk(chunk(text='say "hi"\n', completion_tokens=2, prompt_tokens=11))
    assert events(first) == [
        {
            **HEAD,
            "choices": [choice(0, {"role": "assistant", "content": "", "refusal": None})],
            "usage": None,
        },
        {**HEAD, "choices": [choice(0, {"content": 'say "hi"\n'})], "usage": None},
    ]
    last = framer.chunk(
        chunk(text="!", completion_tokens=1, finish_reason=inference_pb2.FINISH_REASON_LENGTH)
    )
    assert events(last) == [
        {**HEAD, "choices": [choice(0, {"content": "!"})], "usage": None},
        {
            **HEAD,
            "choices": [choice(0, {}, finish_reason="length", stop_reason=None)],
            "usage": None,
        },
    ]
    (usage,) = framer.end(USAGE)
    raw = usage.decode()
    # The cost is a JSON number with the charge's exact digits.
    assert '"cost":0.00000805,"cost_nano_usd":8050' in raw
    assert event(usage) == {
        **HEAD,
        "choices": [],
        "usage": {
            "prompt_tokens": 11,
            "completion_tokens": 3,
            "total_tokens": 14,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
            "cost": 0.00000805,
            "cost_nano_usd": 8050,
            "rate_card_version": "v1",
        },
    }


def test_without_include_usage_chunks_carry_no_usage_field() -> None:
    framer = chat_framer()
    data = framer.chunk(
        chunk(text="x", completion_tokens=1, finish_reason=inference_pb2.FINISH_REASON_STOP)
    )
    assert all("usage" not in e for e in events(data))
    assert framer.end(USAGE) == []
    assert sse.DONE == b"data: [DONE]\n\n"


def test_a_tool_call_opens_in_the_role_chunk_then_streams_its_arguments() -> None:
    framer = chat_framer()
    head = chunk(completion_tokens=1)
    head.tool_calls.add(index=0, id="call_1", name="get_weather", arguments='{"ci')
    second = chunk(completion_tokens=2)
    second.tool_calls.add(index=0, arguments='ty": "Paris"}')
    second.tool_calls.add(index=1, id="call_2", name="get_time")
    end = chunk(completion_tokens=1, finish_reason=inference_pb2.FINISH_REASON_TOOL_CALLS)
    end.tool_calls.add(index=1, arguments="{}")
    deltas = [e["choices"][0]["delta"] for e in events(framer.chunk(head))]
    assert deltas == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ],
            "refusal": None,
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]},
    ]
    deltas = [e["choices"][0]["delta"] for e in events(framer.chunk(second))]
    assert deltas == [
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Paris"}'}}]},
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": ""},
                }
            ]
        },
    ]
    finished = events(framer.chunk(end))
    assert [e["choices"][0]["delta"] for e in finished] == [
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
        {},
    ]
    assert finished[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_choices_open_in_index_order_and_interleave() -> None:
    framer = chat_framer()
    out = events(framer.chunk(chunk(index=1, text="b", completion_tokens=1)))
    assert [(e["choices"][0]["index"], e["choices"][0]["delta"]) for e in out] == [
        (0, {"role": "assistant", "content": "", "refusal": None}),
        (1, {"role": "assistant", "content": "", "refusal": None}),
        (1, {"content": "b"}),
    ]
    out = events(framer.chunk(chunk(index=0, text="a", completion_tokens=1)))
    assert [(e["choices"][0]["index"], e["choices"][0]["delta"]) for e in out] == [
        (0, {"content": "a"})
    ]


def test_reasoning_and_logprobs_ride_their_chunks() -> None:
    framer = chat_framer()
    thought = chunk(reasoning="hmm", completion_tokens=1)
    thought.logprobs.add(token="hmm", logprob=-0.5).top.add(token="hmm", logprob=-0.5)
    answer = chunk(text="é", completion_tokens=1)
    answer.logprobs.add(token="é", logprob=-1e6)
    out = events(framer.chunk(thought) + framer.chunk(answer))
    assert out[1]["choices"][0]["delta"] == {"reasoning": "hmm"}
    assert out[1]["choices"][0]["logprobs"] == {
        "content": [
            {
                "token": "hmm",
                "logprob": -0.5,
                "bytes": [104, 109, 109],
                "top_logprobs": [{"token": "hmm", "logprob": -0.5, "bytes": [104, 109, 109]}],
            }
        ],
        "refusal": None,
    }
    # bytes are UTF-8; a logprob JSON cannot hold is floored as vLLM floors it.
    assert out[2]["choices"][0]["logprobs"]["content"] == [
        {"token": "é", "logprob": -9999.0, "bytes": [195, 169], "top_logprobs": []}
    ]


def test_continuous_usage_counts_the_prompt_and_the_choices_tokens_so_far() -> None:
    framer = chat_framer(include_usage=True, continuous_usage=True)
    first = events(framer.chunk(chunk(text="a b", completion_tokens=2, prompt_tokens=7)))
    assert [e["usage"] for e in first] == [
        {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    ] * 2
    other = events(framer.chunk(chunk(index=1, text="c", completion_tokens=1)))
    assert other[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}
    more = events(framer.chunk(chunk(text=" d", completion_tokens=1)))
    assert more[-1]["usage"]["completion_tokens"] == 3
    # The cost comes only with the request's usage, once it is settled.
    assert "cost" in event(framer.end(USAGE)[0])["usage"]


def test_text_completion_chunks_echo_the_prompt_with_legacy_logprobs() -> None:
    framer = sse.CompletionFramer(
        "cmpl-r1", 1700000000, "m/m", echo=True, logprobs=True, include_usage=True
    )
    first = chunk(text=" there", completion_tokens=1, prompt_text="Hi", prompt_tokens=1)
    first.prompt_logprobs.add(token="Hi")
    lp = first.logprobs.add(token=" there", logprob=-0.25)
    lp.top.add(token=" there", logprob=-0.25)
    lp.top.add(token=" you", logprob=-2.0)
    end = chunk(text="!", completion_tokens=1, finish_reason=inference_pb2.FINISH_REASON_STOP)
    end.stop_string = "?"
    end.logprobs.add(token="!", logprob=-0.5)
    out = events(framer.chunk(first) + framer.chunk(end))
    assert out[0] == {
        "id": "cmpl-r1",
        "object": "text_completion",
        "created": 1700000000,
        "model": "m/m",
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "text": "Hi there",
                "logprobs": {
                    "tokens": ["Hi", " there"],
                    "token_logprobs": [None, -0.25],
                    "top_logprobs": [None, {" there": -0.25, " you": -2.0}],
                    "text_offset": [0, 2],
                },
                "finish_reason": None,
            }
        ],
        "usage": None,
    }
    assert out[1]["choices"][0] == {
        "index": 0,
        "text": "!",
        "logprobs": {
            "tokens": ["!"],
            "token_logprobs": [-0.5],
            "top_logprobs": [{}],
            "text_offset": [8],
        },
        "finish_reason": "stop",
        "stop_reason": "?",
    }


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
