"""The OpenAI surface over gRPC, on the simulated engine: n choices, tools, structured output,
log probabilities and completions, each metered exactly (prompt once, every choice's tokens)."""

from __future__ import annotations

import json

import grpc
import jsonschema
import pytest

from corvex.v1 import inference_pb2, inference_pb2_grpc
from corvex_core.server import Core
from tests.conftest import MODEL
from tests.core.servicers.test_inference_grpc import auth, chat, error_info, make_key

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"],
    "additionalProperties": False,
}


async def chunks_of(stub: inference_pb2_grpc.InferenceStub, request: object, secret: str) -> list:
    return [c async for c in stub.Chat(request, metadata=auth(secret))]


async def test_n_choices_bill_the_prompt_once_and_every_choices_tokens(
    core: Core, channel: grpc.aio.Channel
) -> None:
    secret = await make_key(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    request = chat("several", max_tokens=7, ignore_eos=True, n=3, seed=1)
    chunks = await chunks_of(stub, request, secret)
    per_choice: dict[int, int] = {}
    finished = set()
    for c in chunks:
        per_choice[c.index] = per_choice.get(c.index, 0) + c.completion_tokens
        if c.finish_reason:
            finished.add(c.index)
    assert per_choice == {0: 7, 1: 7, 2: 7} and finished == {0, 1, 2}
    usage = chunks[-1].usage
    assert usage.completion_tokens == 21
    assert usage.cost_nano_usd == usage.prompt_tokens * 350 + 21 * 1400
    assert [c for c in chunks if c.HasField("usage")] == [chunks[-1]]
    assert core.ledger.held_total_nano() == 0


async def test_whole_answers_come_one_chunk_per_choice(channel: grpc.aio.Channel) -> None:
    secret = await make_key(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    streamed = await chunks_of(stub, chat("x", max_tokens=6, n=2, temperature=0), secret)
    whole = await chunks_of(
        stub, chat("x", max_tokens=6, n=2, temperature=0, final_only=True), secret
    )
    assert [c.index for c in whole] == [0, 1]
    for index in (0, 1):
        text = "".join(c.text for c in streamed if c.index == index)
        assert whole[index].text == text and whole[index].finish_reason
    assert whole[-1].usage.completion_tokens == streamed[-1].usage.completion_tokens


async def test_a_required_tool_choice_answers_with_a_call_valid_for_its_schema(
    channel: grpc.aio.Channel,
) -> None:
    secret = await make_key(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    request = chat("weather in Paris?", final_only=True)
    request.tools.add(name="get_weather", parameters_json=json.dumps(WEATHER))
    request.tool_choice.mode = inference_pb2.TOOL_CHOICE_MODE_REQUIRED
    (answer,) = await chunks_of(stub, request, secret)
    assert answer.finish_reason == inference_pb2.FINISH_REASON_TOOL_CALLS
    (call,) = answer.tool_calls
    assert call.id and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)


@pytest.mark.parametrize(
    ("edit", "param"),
    [
        (
            lambda r: setattr(r.tool_choice, "mode", inference_pb2.TOOL_CHOICE_MODE_REQUIRED),
            "tool_choice",
        ),
        (
            lambda r: r.tools.add(name="f", parameters_json="{not json"),
            "tools[0].function.parameters",
        ),
        (lambda r: setattr(r.sampling, "logprobs", 21), "top_logprobs"),
        (lambda r: r.sampling.logit_bias.update({10**6: 5.0}), "logit_bias"),
        (lambda r: setattr(r.sampling, "n", 17), "n"),
    ],
)
async def test_invalid_surface_requests_are_400s_naming_the_param(
    core: Core, channel: grpc.aio.Channel, edit: object, param: str
) -> None:
    secret = await make_key(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    request = chat("x", max_tokens=4)
    edit(request)  # type: ignore[operator]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await chunks_of(stub, request, secret)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(refused.value).metadata["param"] == param
    assert core.ledger.held_total_nano() == 0


async def test_structured_output_is_valid_json_for_the_schema(channel: grpc.aio.Channel) -> None:
    secret = await make_key(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    request = chat("plan", final_only=True)
    request.sampling.response_format.type = inference_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
    request.sampling.response_format.schema_json = json.dumps(WEATHER)
    request.sampling.response_format.name = "weather"
    (answer,) = await chunks_of(stub, request, secret)
    jsonschema.validate(json.loads(answer.text), WEATHER)


async def test_logprobs_come_with_every_token(channel: grpc.aio.Channel) -> None:
    secret = await make_key(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    chunks = await chunks_of(stub, chat("x", max_tokens=5, ignore_eos=True, logprobs=3), secret)
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert len(logprobs) == 5
    for lp in logprobs:
        assert lp.logprob <= 0 and len(lp.top) == 3
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)


async def test_completions_echo_the_prompt_and_are_metered_like_chat(
    channel: grpc.aio.Channel,
) -> None:
    secret = await make_key(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    request = inference_pb2.CompleteRequest(
        model=MODEL,
        text="Once upon a time",
        max_tokens=4,
        echo=True,
        sampling=inference_pb2.Sampling(ignore_eos=True, logprobs=1),
    )
    chunks = [c async for c in stub.Complete(request, metadata=auth(secret))]
    assert chunks[0].prompt_text == "Once upon a time"
    assert len(chunks[0].prompt_logprobs) == 4  # the prompt's tokens, echoed with logprobs
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (4, 4)
    assert usage.cost_nano_usd == 4 * 350 + 4 * 1400
    tokens = inference_pb2.CompleteRequest(
        model=MODEL, tokens=inference_pb2.TokenIds(ids=[1, 2, 3]), max_tokens=2
    )
    last = [c async for c in stub.Complete(tokens, metadata=auth(secret))][-1]
    assert last.usage.prompt_tokens == 3


async def test_the_first_chunk_counts_the_prompt_as_billed(channel: grpc.aio.Channel) -> None:
    secret = await make_key(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    chunks = await chunks_of(stub, chat("count me", max_tokens=3, ignore_eos=True, n=2), secret)
    assert chunks[0].prompt_tokens > 0
    assert chunks[0].prompt_tokens == chunks[-1].usage.prompt_tokens
    assert all(c.prompt_tokens == 0 for c in chunks[1:])
