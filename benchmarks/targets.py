"""Sending one request and timing it: the REST target speaks OpenAI JSON and SSE over a raw
aiohttp client (the openai SDK costs too much CPU to be a load generator), the gRPC target
calls `corvex.v1.Inference/Chat` (or a bare echo method) directly. Each returns a `Sample`;
neither decides how many requests to send or when."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, Literal, Protocol

import aiohttp
import grpc
import msgspec

from benchmarks.workload import RequestSpec
from corvex.v1 import inference_pb2

CHAT_METHOD: Final = "/corvex.v1.Inference/Chat"
OK: Final = "ok"
# A request body is never larger than this in the benchmarks; bodies are cached by spec.
_BODY_CACHE: Final = 4096


class Sample(msgspec.Struct):
    """One request as the client saw it. Durations in seconds, counts as reported by the
    server (usage) when it reports them."""

    status: str
    e2e_s: float
    ttft_s: float | None = None
    # Gaps between consecutive content events (chunks), the inter-token latency.
    gaps_s: list[float] = []
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Content events received: SSE events with text, or gRPC chunks with tokens.
    chunks: int = 0


class Target(Protocol):
    """Anything the load generator can send requests to."""

    name: str

    async def send(self, spec: RequestSpec) -> Sample: ...

    async def __aenter__(self) -> Target: ...

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def failure(exc: BaseException) -> str:
    """The status of a request that did not get an answer."""
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"grpc_{exc.code().name}"
    return f"error_{type(exc).__name__}"


# ---- REST --------------------------------------------------------------------------------


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Completion(msgspec.Struct):
    usage: _Usage | None = None


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None


class _Event(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: Any = None


_completion_decoder = msgspec.json.Decoder(_Completion)
_event_decoder = msgspec.json.Decoder(_Event)
_encoder = msgspec.json.Encoder()


@functools.lru_cache(maxsize=_BODY_CACHE)
def rest_body(spec: RequestSpec) -> bytes:
    """The OpenAI chat request for a spec, encoded once."""
    body: dict[str, Any] = {
        "model": spec.model,
        "messages": [{"role": "user", "content": spec.prompt}],
        "max_tokens": spec.max_tokens,
        "stream": spec.stream,
    }
    if spec.ignore_eos:
        body["ignore_eos"] = True
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    return _encoder.encode(body)


class RestTarget:
    """POST /v1/chat/completions on an OpenAI-compatible server."""

    def __init__(self, base_url: str, *, timeout_s: float = 60.0, name: str = "rest") -> None:
        self.name = name
        self._url = base_url.rstrip("/") + "/v1/chat/completions"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> RestTarget:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, spec: RequestSpec) -> Sample:
        assert self._session is not None, "use the target as an async context manager"
        headers = {"Content-Type": "application/json"}
        if spec.api_key:
            headers["Authorization"] = "Bearer " + spec.api_key
        start = time.perf_counter()
        try:
            async with self._session.post(self._url, data=rest_body(spec), headers=headers) as r:
                if r.status != 200:
                    await r.read()
                    return Sample(f"http_{r.status}", time.perf_counter() - start)
                if spec.stream:
                    return await _read_sse(r, start)
                completion = _completion_decoder.decode(await r.read())
        except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError) as exc:
            return Sample(failure(exc), time.perf_counter() - start)
        e2e = time.perf_counter() - start
        usage = completion.usage or _Usage()
        return Sample(OK, e2e, e2e, [], usage.prompt_tokens, usage.completion_tokens, 1)


async def _read_sse(response: aiohttp.ClientResponse, start: float) -> Sample:
    """Reads an OpenAI event stream to [DONE], timing each event that carries text."""
    sample = Sample(OK, 0.0)
    last = start
    async for line in response.content:
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].strip()
        if payload == b"[DONE]":
            break
        event = _event_decoder.decode(payload)
        if event.error is not None:
            sample.status = "stream_error"
        if event.usage is not None:
            sample.prompt_tokens = event.usage.prompt_tokens
            sample.completion_tokens = event.usage.completion_tokens
        if any(c.delta is not None and c.delta.content for c in event.choices):
            now = time.perf_counter()
            _mark_chunk(sample, start, last, now)
            last = now
    sample.e2e_s = time.perf_counter() - start
    return sample


def _mark_chunk(sample: Sample, start: float, last: float, now: float) -> None:
    if sample.ttft_s is None:
        sample.ttft_s = now - start
    else:
        sample.gaps_s.append(now - last)
    sample.chunks += 1


# ---- gRPC --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=_BODY_CACHE)
def grpc_body(spec: RequestSpec) -> bytes:
    """The serialized ChatRequest for a spec, built once. A non-streaming spec asks for the
    whole answer in one chunk (`final_only`), as the edge does for its non-streaming requests."""
    request = inference_pb2.ChatRequest(
        model=spec.model,
        messages=[inference_pb2.ChatMessage(role="user", content=spec.prompt)],
        max_tokens=spec.max_tokens,
        sampling=inference_pb2.Sampling(ignore_eos=spec.ignore_eos),
        final_only=not spec.stream,
    )
    return request.SerializeToString()


def _identity(data: bytes) -> bytes:
    return data


class GrpcTarget:
    """A server-streaming ChatRequest → ChatChunk call (or a unary one, for the ceilings)."""

    def __init__(
        self,
        address: str,
        *,
        method: str = CHAT_METHOD,
        unary: bool = False,
        timeout_s: float = 60.0,
        name: str = "grpc",
    ) -> None:
        self.name = name
        self._address = address
        self._method = method
        self._unary = unary
        self._timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._rpc: Callable[..., Any] | None = None

    async def __aenter__(self) -> GrpcTarget:
        self._channel = grpc.aio.insecure_channel(self._address)
        factory = self._channel.unary_unary if self._unary else self._channel.unary_stream
        self._rpc = factory(
            self._method,
            request_serializer=_identity,
            response_deserializer=inference_pb2.ChatChunk.FromString,
        )
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def send(self, spec: RequestSpec) -> Sample:
        assert self._rpc is not None, "use the target as an async context manager"
        metadata = (("authorization", "Bearer " + spec.api_key),) if spec.api_key else ()
        start = time.perf_counter()
        try:
            call = self._rpc(grpc_body(spec), metadata=metadata, timeout=self._timeout_s)
            if self._unary:
                return _unary_sample(await call, start)
            return await _read_chunks(call, start)
        except grpc.aio.AioRpcError as exc:
            return Sample(failure(exc), time.perf_counter() - start)


def _unary_sample(chunk: inference_pb2.ChatChunk, start: float) -> Sample:
    e2e = time.perf_counter() - start
    usage = chunk.usage
    return Sample(OK, e2e, e2e, [], usage.prompt_tokens, usage.completion_tokens, 1)


async def _read_chunks(call: Any, start: float) -> Sample:
    sample = Sample(OK, 0.0)
    last = start
    while True:
        chunk = await call.read()
        if chunk is grpc.aio.EOF:
            break
        if chunk.completion_tokens:
            now = time.perf_counter()
            _mark_chunk(sample, start, last, now)
            last = now
        if chunk.HasField("usage"):
            sample.prompt_tokens = chunk.usage.prompt_tokens
            sample.completion_tokens = chunk.usage.completion_tokens
    sample.e2e_s = time.perf_counter() - start
    return sample


# ---- choosing a target -------------------------------------------------------------------


class Endpoint(msgspec.Struct, frozen=True):
    """Where to send load: "rest" (base URL), "grpc" (host:port, server-streaming method) or
    "grpc-unary" (host:port, a unary method: the bare gRPC ceiling)."""

    kind: Literal["rest", "grpc", "grpc-unary"]
    address: str
    method: str = CHAT_METHOD
    timeout_s: float = 60.0

    def describe(self) -> str:
        return f"{self.kind} {self.address}" + ("" if self.kind == "rest" else self.method)


def open_target(endpoint: Endpoint) -> Target:
    """A target for the endpoint; enter it (async with) inside the event loop that uses it."""
    if endpoint.kind == "rest":
        return RestTarget(endpoint.address, timeout_s=endpoint.timeout_s)
    return GrpcTarget(
        endpoint.address,
        method=endpoint.method,
        unary=endpoint.kind == "grpc-unary",
        timeout_s=endpoint.timeout_s,
        name=endpoint.kind,
    )
