"""Stalls: how long one maximal request holds up everybody else on the core.

A probe measures the latency of a cheap call (gRPC `ListModels`) every few milliseconds,
and the gaps between the tokens of a paced stream, first with nothing else running and then
while one maximal request of each kind runs: 2,048 embedding inputs (the most a request may
hold), a Tokenize of a message just under `core.max_request_bytes`, and a chat whose prompt
is as large as the edge's body limit allows. What it reports is the worst probe latency and
stream gap during each, next to the idle ones: the figure issue 12 bounds to "a few ms" above
idle. It belongs in a benchmark, not a timed test: on a shared machine only the ratio to the
idle figures in the same run means much.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import msgspec

from benchmarks.stats import Distribution, distribution
from benchmarks.systems import CorvexVariant, System, corvex
from benchmarks.workload import DEFAULT_MODEL
from corvex.v1 import inference_pb2, inference_pb2_grpc

_PROBE_EVERY_S = 0.005
_IDLE_S = 2.0
# Embedding inputs: 2,048 of ~140 tokens, under the 300,000-token bound of one request.
_EMBED_INPUT = "word " * 140
# A Tokenize message just under the core's default max_request_bytes (8 MiB).
_TOKENIZE_BYTES = 8 * 1024 * 1024 - 4096


class Case(msgspec.Struct, frozen=True):
    """The probe's latencies and the stream's token gaps while one request ran."""

    name: str
    request_s: float
    probe_ms: Distribution
    gap_ms: Distribution
    error: str | None = None


class StallsResult(msgspec.Struct, frozen=True):
    idle: Case
    cases: list[Case]


async def _probe(stub: Any, latencies: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        await stub.ListModels(inference_pb2.ListModelsRequest())
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(_PROBE_EVERY_S)


async def _stream(stub: Any, key: str, gaps: list[float], stop: asyncio.Event) -> None:
    """A paced stream (the engine steps every 5 ms), restarted until told to stop."""
    metadata = (("authorization", f"Bearer {key}"),)
    while not stop.is_set():
        request = inference_pb2.ChatRequest(
            model=DEFAULT_MODEL,
            messages=[inference_pb2.ChatMessage(role="user", content="a stream")],
            max_tokens=400,
            sampling=inference_pb2.Sampling(ignore_eos=True),
        )
        last = time.perf_counter()
        async for _ in stub.Chat(request, metadata=metadata):
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            if stop.is_set():
                break


@contextlib.asynccontextmanager
async def _watched(stub: Any, key: str) -> AsyncIterator[tuple[list[float], list[float]]]:
    latencies: list[float] = []
    gaps: list[float] = []
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(_probe(stub, latencies, stop)),
        asyncio.create_task(_stream(stub, key, gaps, stop)),
    ]
    await asyncio.sleep(0.3)  # the stream is under way
    latencies.clear()
    gaps.clear()
    try:
        yield latencies, gaps
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _case(name: str, stub: Any, key: str, address: str, kind: str | None) -> Case:
    """The probes while one request of `kind` runs, sent by another process (so neither the
    probes' event loop nor their connection carries its bytes)."""
    async with _watched(stub, key) as (latencies, gaps):
        started = time.perf_counter()
        error = None
        if kind is None:
            await asyncio.sleep(_IDLE_S)
        else:
            sender = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "benchmarks.stalls", kind, address, key,
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await sender.communicate()
            error = out.decode().strip() or None
            await asyncio.sleep(0.2)  # what a stall left behind
        elapsed = time.perf_counter() - started
    return Case(name, elapsed, distribution(latencies), distribution(gaps), error)


async def _measure(system: System) -> StallsResult:
    address = system.grpc_address
    assert address is not None
    key = system.api_keys[0]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        idle = await _case("idle", stub, key, address, None)
        cases = [await _case(name, stub, key, address, kind) for kind, name in _KINDS.items()]
    return StallsResult(idle, cases)


_KINDS = {
    "embed": "2,048 embedding inputs",
    "tokenize": "Tokenize of 8 MiB",
    "chat": "chat with a 4 MiB prompt",
}


async def _send(kind: str, address: str, key: str) -> str:
    """Sends one maximal request; returns its error, or "" when it succeeded."""
    metadata = (("authorization", f"Bearer {key}"),)
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024),
               ("grpc.max_receive_message_length", 64 * 1024 * 1024)]  # fmt: skip
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        try:
            if kind == "embed":
                inputs = [inference_pb2.EmbedInput(text=_EMBED_INPUT)] * 2048
                await stub.Embed(
                    inference_pb2.EmbedRequest(model=DEFAULT_MODEL, inputs=inputs),
                    metadata=metadata,
                )
            elif kind == "tokenize":
                text = "tok " * (_TOKENIZE_BYTES // 4)
                request = inference_pb2.TokenizeRequest(model=DEFAULT_MODEL, text=text)
                await stub.Tokenize(request, metadata=metadata)
            else:
                content = "w " * (2 * 1024 * 1024)
                chat = inference_pb2.ChatRequest(
                    model=DEFAULT_MODEL,
                    messages=[inference_pb2.ChatMessage(role="user", content=content)],
                    max_tokens=1,
                )
                async for _ in stub.Chat(chat, metadata=metadata):
                    pass
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {(exc.details() or '')[:80]}"
    return ""


def run() -> StallsResult:
    """Starts a Corvex stack (engine step 5 ms) and measures every case against it."""
    variant = CorvexVariant(tpot_ms=5.0, keys=1)
    with corvex("corvex", variant) as system:
        return asyncio.run(_measure(system))


def report(result: StallsResult) -> str:
    lines = [
        "| while | request took | ListModels p50 / max | stream gap p50 / max | note |",
        "|---|---|---|---|---|",
    ]
    for case in (result.idle, *result.cases):
        lines.append(
            f"| {case.name} | {case.request_s * 1000:.0f} ms "
            f"| {case.probe_ms.p50_ms:.1f} / {case.probe_ms.max_ms:.1f} ms "
            f"| {case.gap_ms.p50_ms:.1f} / {case.gap_ms.max_ms:.1f} ms "
            f"| {case.error or ''} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    # `python -m benchmarks.stalls KIND ADDRESS KEY`: the sender process of one case.
    print(asyncio.run(_send(*sys.argv[1:4])))
