"""What the load generator's gRPC target asks the core for."""

from __future__ import annotations

import pytest

from benchmarks.targets import grpc_body
from benchmarks.workload import RequestSpec
from corvex.v1 import inference_pb2


@pytest.mark.parametrize("stream", [False, True])
def test_a_non_streaming_request_asks_for_the_whole_answer(stream: bool) -> None:
    # As the edge asks for a non-streaming one: otherwise a paced engine would send a chunk
    # per step to a client that only wants the end, and the case would measure streaming.
    spec = RequestSpec(
        model="m", prompt="hello", max_tokens=8, stream=stream, ignore_eos=True, api_key=None
    )
    request = inference_pb2.ChatRequest.FromString(grpc_body(spec))
    assert request.final_only is not stream
    assert (request.model, request.max_tokens, request.sampling.ignore_eos) == ("m", 8, True)
