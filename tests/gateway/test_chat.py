"""`to_rpc` of the chat and embeddings routes: what the edge checks itself (only what the wire
types cannot express) and how an OpenAI request becomes the gRPC request."""

from __future__ import annotations

import msgspec
import pytest

from corvex.v1 import inference_pb2
from gateway import chat, embeddings
from gateway.errors import BadRequest
from gateway.openai_types import ChatCompletionRequest, EmbeddingRequest


def chat_request(**fields: object) -> ChatCompletionRequest:
    body = {"model": "m/m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.convert(body, ChatCompletionRequest)


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
        ({"n": 2}, "n"),
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


def test_embedding_inputs_of_every_shape() -> None:
    def inputs(value: object) -> list[inference_pb2.EmbedInput]:
        request = msgspec.convert({"model": "m/m", "input": value}, EmbeddingRequest)
        return list(embeddings.to_rpc(request).inputs)

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
