"""The edge's side of a chat stream, against a scripted core: the real edge process and the
OpenAI SDK, with a gRPC Inference servicer in the test that decides when the status comes,
when the stream fails and sees whether the edge cancelled the call.

The scripted core stands where a loaded real core would be: its status can trail the final
chunk, and it can fail after the first chunk. Those moments cannot be caused at will in the
real core, so the e2e tests cannot pin them down.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from corvex.v1 import inference_pb2, inference_pb2_grpc
from corvex_ops.stack import Process, launch
from tests.e2e.test_operability import samples, value
from tests.gateway.http_wire import connect, post

pytestmark = pytest.mark.e2e

MODEL = "scripted/model"
CHAT = "/v1/chat/completions"
FINAL = inference_pb2.ChatChunk(
    finish_reason=inference_pb2.FINISH_REASON_STOP,
    usage=inference_pb2.Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2),
)


@dataclass
class ScriptedCore(inference_pb2_grpc.InferenceServicer):
    """Chat streams as `script` says; each call's outcome is recorded."""

    script: Callable[[grpc.aio.ServicerContext], AsyncIterator[inference_pb2.ChatChunk]] | None = (
        None
    )
    outcomes: list[str] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def Chat(
        self, request: inference_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.ChatChunk]:
        assert self.script is not None
        try:
            async for chunk in self.script(context):
                yield chunk
            self.outcomes.append("finished")
        except asyncio.CancelledError:
            self.outcomes.append("cancelled")
            raise
        finally:
            self.ended.set()


@dataclass
class Rig:
    core: ScriptedCore
    edge: Process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.edge.ready['http_port']}"

    def edge_requests(self, status: int) -> float:
        found = samples(f"http://127.0.0.1:{self.edge.ready['metrics_port']}/metrics")
        return value(found, "corvex_edge_requests_total", route=CHAT, status=str(status))


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    core = ScriptedCore()
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(core, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # The scripted core serves Chat calls: the edge sends each request as a call of its own.
    config = tmp_path / "edge.yaml"
    config.write_text("edge:\n  core_transport: calls\n")
    args = ["edge", "--config", str(config), "--port", "0", "--core", f"127.0.0.1:{port}",
            "--metrics-port", "0"]  # fmt: skip
    edge = await asyncio.to_thread(launch, "edge", args, workdir=tmp_path)
    try:
        yield Rig(core, edge)
    finally:
        await asyncio.to_thread(edge.stop)
        await server.stop(grace=0)


def client(rig: Rig) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=rig.url + "/v1", api_key="corvex-test", max_retries=0)


async def test_a_finished_stream_is_read_to_its_status_and_never_cancelled(rig: Rig) -> None:
    async def status_trails_the_final_chunk(context: Any) -> AsyncIterator[inference_pb2.ChatChunk]:
        yield inference_pb2.ChatChunk(text="Hello")
        yield FINAL
        await asyncio.sleep(0.3)  # the status follows the final chunk later, as under load

    rig.core.script = status_trails_the_final_chunk
    async with client(rig) as sdk:
        stream = await sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices[0].finish_reason == "stop"
    await asyncio.wait_for(rig.core.ended.wait(), 10)
    assert rig.core.outcomes == ["finished"]
    assert await asyncio.to_thread(rig.edge_requests, 200) == 1


async def test_an_error_after_the_stream_started_ends_it_with_an_error_event(rig: Rig) -> None:
    async def engine_dies(context: Any) -> AsyncIterator[inference_pb2.ChatChunk]:
        yield inference_pb2.ChatChunk(text="Hel")
        await context.abort(grpc.StatusCode.UNAVAILABLE, "engine died")

    rig.core.script = engine_dies
    async with client(rig) as sdk:
        stream = await sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True
        )
        received = []
        with pytest.raises(openai.APIError) as failed:
            async for chunk in stream:
                received.append(chunk)
    assert received and received[-1].choices[0].delta.content == "Hel"
    assert "unreachable" in failed.value.message
    # Counted as what the client was told, not as the 200 of the status line.
    assert await asyncio.to_thread(rig.edge_requests, 503) == 1
    assert await asyncio.to_thread(rig.edge_requests, 200) == 0


async def test_a_client_that_hangs_up_cancels_the_call_and_counts_as_499(rig: Rig) -> None:
    async def endless(context: Any) -> AsyncIterator[inference_pb2.ChatChunk]:
        while True:
            yield inference_pb2.ChatChunk(text="more ")
            await asyncio.sleep(0.01)

    rig.core.script = endless
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
    ).encode()
    sock = await asyncio.to_thread(connect, rig.url)
    with sock:
        await asyncio.to_thread(sock.sendall, post(CHAT, body, b"Content-Type: application/json"))
        first = await asyncio.to_thread(sock.recv, 65536)
        assert first.startswith(b"HTTP/1.1 200")
    await asyncio.wait_for(rig.core.ended.wait(), 10)
    assert rig.core.outcomes == ["cancelled"]
    for _ in range(100):  # the edge counts the request once its handler has unwound
        if await asyncio.to_thread(rig.edge_requests, 499):
            break
        await asyncio.sleep(0.05)
    assert await asyncio.to_thread(rig.edge_requests, 499) == 1
