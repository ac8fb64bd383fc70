"""`to_rpc` of the chat, completions and embeddings routes: what the edge checks itself (only
what the wire types cannot express, and what the parameter table refuses) and how an OpenAI
request becomes the gRPC request."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from corvex.v1 import inference_pb2
from gateway import chat, completions, decoding, embeddings
from gateway.errors import BadRequest
from gateway.openai_types import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    chat_decoder,
    completion_decoder,
    embedding_decoder,
)


def chat_request(**fields: object) -> ChatCompletionRequest:
    body = {"model": "m/m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return decoding.parse(msgspec.json.encode(body), chat_decoder)


def completion_request(**fields: object) -> CompletionRequest:
    return decoding.parse(msgspec.json.encode({"model": "m/m", **fields}), completion_decoder)


def test_a_chat_request_becomes_the_grpc_request() -> None:
    rpc = chat.to_rpc(
        chat_request(
            messages=[
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
            max_completion_tokens=5,
            temperature=0.0,
            stop="END",
            seed=-3,
            user="u1",
        )
    )
    assert rpc == inference_pb2.ChatRequest(
        model="m/m",
        messages=[
            inference_pb2.ChatMessage(role="system", content="Be brief."),
            inference_pb2.ChatMessage(role="user", content="ab"),
        ],
        max_tokens=5,
        sampling=inference_pb2.Sampling(temperature=0.0, stop=["END"], seed=-3),
        user="u1",
        final_only=True,
    )
    assert rpc.sampling.HasField("temperature") and not rpc.sampling.HasField("top_p")


def test_a_streamed_request_is_not_folded() -> None:
    assert not chat.to_rpc(chat_request(stream=True)).final_only


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": -1}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {str(2**32): 1}}, "logit_bias"),
        ({"stop_token_ids": [-1]}, "stop_token_ids[0]"),
        ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options"),
        ({"stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0].type"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": {"type": "function"}}, "tool_choice"),
        ({"response_format": {"type": "regex"}}, "response_format.type"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        ({"store": True}, "store"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"echo": True}, "echo"),
        ({"min_tokens": 3}, "min_tokens"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0].type",
        ),
        ({"max_tokens": 1, "max_completion_tokens": 1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 2**31}, "max_completion_tokens"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": ""}, "model"),
        ({"seed": 2**63}, "seed"),
    ],
)
def test_what_the_wire_cannot_carry_is_a_400_naming_the_field(
    fields: dict[str, object], param: str
) -> None:
    with pytest.raises(BadRequest) as refused:
        chat.to_rpc(chat_request(**fields))
    assert refused.value.body.param == param


def test_refused_parameters_pass_as_null_or_with_their_default() -> None:
    rpc = chat.to_rpc(
        chat_request(store=False, modalities=["text"], echo=False, skip_special_tokens=True)
    )
    assert rpc.model == "m/m"
    assert chat.to_rpc(chat_request(functions=None, audio=None)).model == "m/m"


def test_tools_a_tool_loop_and_structured_output_become_the_grpc_request() -> None:
    weather = {"type": "object", "properties": {"city": {"type": "string"}}}
    rpc = chat.to_rpc(
        chat_request(
            messages=[
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "reasoning_content": "look it up",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "P"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
            tools=[
                {
                    "type": "function",
                    "function": {"name": "get_weather", "parameters": weather, "strict": True},
                }
            ],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            parallel_tool_calls=False,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "w", "schema": weather, "strict": True},
            },
            logprobs=True,
            top_logprobs=3,
            n=2,
            logit_bias={"7": -100},
            top_k=5,
            stop_token_ids=[9],
            reasoning_effort="low",
            chat_template_kwargs={"enable_thinking": False},
        )
    )
    assistant, tool = rpc.messages[1], rpc.messages[2]
    assert assistant.tool_calls[0] == inference_pb2.ToolCall(
        id="call_1", name="get_weather", arguments='{"city": "P"}'
    )
    assert assistant.reasoning == "look it up"
    assert (tool.role, tool.tool_call_id, tool.content) == ("tool", "call_1", "sunny")
    assert rpc.tools[0].name == "get_weather" and rpc.tools[0].strict
    assert json.loads(rpc.tools[0].parameters_json) == weather
    assert rpc.tool_choice == inference_pb2.ToolChoice(
        mode=inference_pb2.TOOL_CHOICE_MODE_NAMED, name="get_weather"
    )
    assert rpc.HasField("parallel_tool_calls") and not rpc.parallel_tool_calls
    sampling = rpc.sampling
    assert sampling.response_format.type == inference_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
    assert json.loads(sampling.response_format.schema_json) == weather
    assert (sampling.logprobs, sampling.n, sampling.top_k) == (3, 2, 5)
    assert dict(sampling.logit_bias) == {7: -100.0}
    assert list(sampling.stop_token_ids) == [9]
    assert rpc.reasoning_effort == "low"
    assert json.loads(rpc.chat_template_kwargs_json) == {"enable_thinking": False}


def test_logprobs_without_top_logprobs_is_the_sampled_tokens_only() -> None:
    assert chat.to_rpc(chat_request(logprobs=True)).sampling.logprobs == 0
    assert not chat.to_rpc(chat_request(logprobs=False)).sampling.HasField("logprobs")


@pytest.mark.parametrize(
    ("prompt", "text", "ids"),
    [
        ("Once", "Once", []),
        (["Once"], "Once", []),
        ([1, 2], "", [1, 2]),
        ([[3, 4]], "", [3, 4]),
    ],
)
def test_one_completions_prompt_of_every_shape(prompt: Any, text: str, ids: list[int]) -> None:
    rpc = completions.to_rpc(completion_request(prompt=prompt))
    assert (rpc.text, list(rpc.tokens.ids)) == (text, ids)
    assert rpc.max_tokens == 16  # OpenAI's default
    assert rpc.final_only


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [[1], [2]]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", 1]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": "a", "suffix": "z"}, "suffix"),
        ({"prompt": "a", "best_of": 2}, "best_of"),
        ({"prompt": "a", "logprobs": 21}, "logprobs"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "echo": True, "logprobs": 2, "prompt_logprobs": 3}, "prompt_logprobs"),
    ],
)
def test_what_completions_refuse(fields: dict[str, object], param: str) -> None:
    with pytest.raises(BadRequest) as refused:
        completions.to_rpc(completion_request(**fields))
    assert refused.value.body.param == param


def test_completions_defaults_and_extras() -> None:
    rpc = completions.to_rpc(
        completion_request(
            prompt="a", max_tokens=None, echo=True, logprobs=2, best_of=1, suffix=None, n=3
        )
    )
    assert not rpc.HasField("max_tokens")  # null: as many as the context and balance allow
    assert rpc.echo and rpc.sampling.logprobs == 2 and rpc.sampling.n == 3
    # vllm bench serve's body.
    bench = completions.to_rpc(
        completion_request(
            prompt="a b c",
            repetition_penalty=1.0,
            max_tokens=8,
            logprobs=None,
            stream=True,
            stream_options={"include_usage": True},
            ignore_eos=True,
        )
    )
    assert bench.max_tokens == 8 and bench.sampling.ignore_eos and not bench.final_only


def test_embedding_inputs_of_every_shape() -> None:
    def inputs(value: object) -> list[inference_pb2.EmbedInput]:
        request = msgspec.convert({"model": "m/m", "input": value}, EmbeddingRequest)
        return list(embeddings.to_rpc(request).inputs)

    refusing = embedding_decoder.decode(
        b'{"model": "m/m", "input": "a", "truncate_prompt_tokens": 8}'
    )
    with pytest.raises(BadRequest) as refused:
        embeddings.to_rpc(refusing)
    assert refused.value.body.param == "truncate_prompt_tokens"

    assert inputs("a") == [inference_pb2.EmbedInput(text="a")]
    assert inputs([1, 2]) == [inference_pb2.EmbedInput(tokens=inference_pb2.TokenIds(ids=[1, 2]))]
    assert inputs(["a", [3]]) == [
        inference_pb2.EmbedInput(text="a"),
        inference_pb2.EmbedInput(tokens=inference_pb2.TokenIds(ids=[3])),
    ]
    with pytest.raises(BadRequest):
        inputs([])
    with pytest.raises(BadRequest):
        inputs([[2**32]])


def test_dimensions_are_checked_only_against_the_wire() -> None:
    def rpc(dimensions: int) -> inference_pb2.EmbedRequest:
        request = msgspec.convert(
            {"model": "m/m", "input": "a", "dimensions": dimensions}, EmbeddingRequest
        )
        return embeddings.to_rpc(request)

    # The core owns the bound (the engine's vector size): the edge forwards what uint32 holds.
    assert rpc(70_000).dimensions == 70_000
    assert rpc(0).HasField("dimensions")
    for unrepresentable in (-1, 2**32):
        with pytest.raises(BadRequest) as refused:
            rpc(unrepresentable)
        assert refused.value.body.param == "dimensions"
