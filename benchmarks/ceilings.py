"""The ceilings: servers that do nothing but the wire work, to bound what any Python edge and
hop can do on this machine. Each runs as its own process (`python -m benchmarks.ceilings
KIND --port 0 --ready-file F`) so its CPU is measured alone:

  aiohttp   a bare aiohttp handler returning a canned OpenAI chat completion (JSON or SSE,
            one event per token); also the backend behind the LiteLLM peer
  grpc      a bare grpc.aio echo: `bench.Echo/Unary` (one ChatChunk) and `bench.Echo/Stream`
            (one ChatChunk per token, the last one with usage), Corvex's own message types;
            with --step-ms the stream is paced like an engine at node load: one message per
            stream per decode step, every stream woken by one shared step clock
  skeleton  an aiohttp handler that calls the `grpc` echo: the edge → core hop with no
            business logic, for non-streaming over a unary call (or, with
            --nonstream-rpc stream, over the server-streaming call the real edge uses);
            streamed answers are one SSE event (OpenAI chunk shape) per gRPC message, so in
            front of a paced echo it is the paced SSE skeleton
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

import grpc
import msgspec
import uvloop
from aiohttp import web

from corvex import readyfile
from corvex.v1 import inference_pb2

ECHO_SERVICE: Final = "bench.Echo"
UNARY_METHOD: Final = f"/{ECHO_SERVICE}/Unary"
STREAM_METHOD: Final = f"/{ECHO_SERVICE}/Stream"
_WORD: Final = "tok"
_encoder = msgspec.json.Encoder()


class _Message(msgspec.Struct):
    role: str = "user"
    content: str = ""


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _ChatBody(msgspec.Struct):
    """The fields of an OpenAI chat request that the canned servers look at."""

    model: str = "canned"
    messages: list[_Message] = []
    max_tokens: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    ignore_eos: bool = False


_body_decoder = msgspec.json.Decoder(_ChatBody)


@functools.lru_cache(maxsize=1024)
def canned_text(tokens: int) -> str:
    return " ".join([_WORD] * tokens)


def _prompt_tokens(messages: list[Any]) -> int:
    return sum(len(m.content.split()) for m in messages)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _completion(model: str, text: str, prompt: int, completion: int) -> bytes:
    return _encoder.encode(
        {
            "id": "chatcmpl-canned",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "length",
                }
            ],
            "usage": _usage(prompt, completion),
        }
    )


class _Sse:
    """OpenAI chat.completion.chunk events for one stream."""

    def __init__(self, model: str) -> None:
        self._head = {
            "id": "chatcmpl-canned",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

    def event(self, delta: dict[str, str], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return b"data: " + _encoder.encode({**self._head, "choices": [choice]}) + b"\n\n"

    def usage(self, prompt: int, completion: int) -> bytes:
        body = {**self._head, "choices": [], "usage": _usage(prompt, completion)}
        return b"data: " + _encoder.encode(body) + b"\n\n"


async def _open_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    return response


# ---- aiohttp: a canned chat completion ------------------------------------------------------


async def canned_chat(request: web.Request) -> web.StreamResponse:
    body = _body_decoder.decode(await request.read())
    tokens = body.max_tokens or 16
    prompt = _prompt_tokens(body.messages)
    if not body.stream:
        return web.Response(
            body=_completion(body.model, canned_text(tokens), prompt, tokens),
            content_type="application/json",
        )
    sse = _Sse(body.model)
    response = await _open_sse(request)
    await response.write(sse.event({"role": "assistant", "content": ""}))
    for index in range(tokens):
        await response.write(sse.event({"content": _WORD if index == 0 else " " + _WORD}))
    await response.write(sse.event({}, "length"))
    if body.stream_options and body.stream_options.include_usage:
        await response.write(sse.usage(prompt, tokens))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def canned_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", canned_chat)
    return app


# ---- grpc.aio: unary and server-streaming echo -----------------------------------------------


def _final_chunk(request: inference_pb2.ChatRequest, text: str, tokens: int) -> Any:
    prompt = _prompt_tokens(list(request.messages))
    return inference_pb2.ChatChunk(
        text=text,
        completion_tokens=tokens,
        finish_reason=inference_pb2.FINISH_REASON_LENGTH,
        usage=inference_pb2.Usage(
            prompt_tokens=prompt, completion_tokens=tokens, total_tokens=prompt + tokens
        ),
    )


async def echo_unary(request: inference_pb2.ChatRequest, context: Any) -> Any:
    tokens = request.max_tokens or 16
    return _final_chunk(request, canned_text(tokens), tokens)


class StepClock:
    """The decode step of a paced echo: one timer for every stream, as one engine step
    advances every running request. Like the simulated engine's step loop, it sleeps a step,
    wakes every waiting stream at once, and sleeps again (so a step stretches when the
    process is too busy to keep time); it runs only while some stream waits."""

    def __init__(self, step_s: float) -> None:
        assert step_s > 0, "a paced echo needs a positive step"
        self._step_s = step_s
        # An Event, not one shared Future: a cancelled stream must not cancel the others' wait.
        self._event = asyncio.Event()
        self._waiting = 0
        self._task: asyncio.Task[None] | None = None

    async def next_step(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._waiting += 1
        try:
            await self._event.wait()
        finally:
            self._waiting -= 1

    async def _run(self) -> None:
        # Woken streams are still counted when the loop checks (they have not run yet), so
        # it stops one idle step after the last stream ends.
        while self._waiting:
            await asyncio.sleep(self._step_s)
            self._event.set()
            self._event.clear()
        self._task = None


def _stream_messages(request: inference_pb2.ChatRequest) -> Iterator[Any]:
    """One ChatChunk per token; the last carries the finish reason and usage."""
    tokens = request.max_tokens or 16
    for index in range(tokens - 1):
        yield inference_pb2.ChatChunk(
            text=_WORD if index == 0 else " " + _WORD, completion_tokens=1
        )
    final = _final_chunk(request, _WORD if tokens == 1 else " " + _WORD, tokens)
    final.completion_tokens = 1
    yield final


async def echo_stream(request: inference_pb2.ChatRequest, context: Any) -> AsyncIterator[Any]:
    for message in _stream_messages(request):
        yield message


def paced_stream(clock: StepClock) -> Any:
    """`bench.Echo/Stream` paced by `clock`: each message waits for the next step."""

    async def stream(request: inference_pb2.ChatRequest, context: Any) -> AsyncIterator[Any]:
        for message in _stream_messages(request):
            await clock.next_step()
            yield message

    return stream


def echo_handler(step_ms: float = 0.0) -> Any:
    stream = paced_stream(StepClock(step_ms / 1000)) if step_ms > 0 else echo_stream
    codec = {
        "request_deserializer": inference_pb2.ChatRequest.FromString,
        "response_serializer": inference_pb2.ChatChunk.SerializeToString,
    }
    return grpc.method_handlers_generic_handler(
        ECHO_SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(echo_unary, **codec),
            "Stream": grpc.unary_stream_rpc_method_handler(stream, **codec),
        },
    )


# ---- aiohttp → grpc: the skeleton of the edge -------------------------------------------------


_CHANNEL: web.AppKey[grpc.aio.Channel] = web.AppKey("channel", grpc.aio.Channel)
_NONSTREAM_RPC: web.AppKey[str] = web.AppKey("nonstream_rpc", str)


def _rpc_request(body: _ChatBody) -> Any:
    return inference_pb2.ChatRequest(
        model=body.model,
        messages=[inference_pb2.ChatMessage(role=m.role, content=m.content) for m in body.messages],
        max_tokens=body.max_tokens or 16,
        sampling=inference_pb2.Sampling(ignore_eos=body.ignore_eos),
    )


def _unary_call(request: web.Request) -> Any:
    return request.app[_CHANNEL].unary_unary(
        UNARY_METHOD,
        request_serializer=inference_pb2.ChatRequest.SerializeToString,
        response_deserializer=inference_pb2.ChatChunk.FromString,
    )


def _stream_call(request: web.Request) -> Any:
    return request.app[_CHANNEL].unary_stream(
        STREAM_METHOD,
        request_serializer=inference_pb2.ChatRequest.SerializeToString,
        response_deserializer=inference_pb2.ChatChunk.FromString,
    )


async def skeleton_chat(request: web.Request) -> web.StreamResponse:
    body = _body_decoder.decode(await request.read())
    rpc_request = _rpc_request(body)
    if body.stream:
        return await _skeleton_stream(request, body, rpc_request)
    if request.app[_NONSTREAM_RPC] == "unary":
        chunks = [await _unary_call(request)(rpc_request)]
    else:
        chunks = [chunk async for chunk in _stream_call(request)(rpc_request)]
    usage = chunks[-1].usage
    text = "".join(chunk.text for chunk in chunks)
    return web.Response(
        body=_completion(body.model, text, usage.prompt_tokens, usage.completion_tokens),
        content_type="application/json",
    )


async def _skeleton_stream(
    request: web.Request, body: _ChatBody, rpc_request: Any
) -> web.StreamResponse:
    sse = _Sse(body.model)
    response = await _open_sse(request)
    await response.write(sse.event({"role": "assistant", "content": ""}))
    usage = None
    async for chunk in _stream_call(request)(rpc_request):
        if chunk.text:
            await response.write(sse.event({"content": chunk.text}))
        if chunk.finish_reason:
            usage = chunk.usage
    await response.write(sse.event({}, "length"))
    if usage is not None and body.stream_options and body.stream_options.include_usage:
        await response.write(sse.usage(usage.prompt_tokens, usage.completion_tokens))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def skeleton_app(backend: str, nonstream_rpc: str) -> web.Application:
    app = web.Application()
    app[_NONSTREAM_RPC] = nonstream_rpc

    async def channel_ctx(app: web.Application) -> AsyncIterator[None]:
        app[_CHANNEL] = grpc.aio.insecure_channel(backend)
        yield
        await app[_CHANNEL].close()

    app.cleanup_ctx.append(channel_ctx)
    app.router.add_post("/v1/chat/completions", skeleton_chat)
    return app


# ---- running one as a process ------------------------------------------------------------------


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_http(app: web.Application, host: str, port: int, ready_file: str | None) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    if ready_file:
        readyfile.write(ready_file, http_port=runner.addresses[0][1])
    await _until_signalled()
    await runner.cleanup()


async def serve_grpc(host: str, port: int, ready_file: str | None, step_ms: float = 0.0) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((echo_handler(step_ms),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    if ready_file:
        readyfile.write(ready_file, grpc_port=bound)
    await _until_signalled()
    await server.stop(grace=1.0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ceilings", description=__doc__)
    parser.add_argument("kind", choices=["aiohttp", "grpc", "skeleton"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backend", help="skeleton: host:port of the grpc echo")
    parser.add_argument("--nonstream-rpc", choices=["unary", "stream"], default="unary")
    parser.add_argument(
        "--step-ms",
        type=float,
        default=0.0,
        help="grpc: pace Stream at one message per stream per step (0: as fast as it can)",
    )
    parser.add_argument("--ready-file")
    args = parser.parse_args(argv)
    if args.kind == "grpc":
        uvloop.run(serve_grpc(args.host, args.port, args.ready_file, args.step_ms))
    elif args.kind == "aiohttp":
        uvloop.run(serve_http(canned_app(), args.host, args.port, args.ready_file))
    else:
        if not args.backend:
            parser.error("skeleton needs --backend HOST:PORT")
        app = skeleton_app(args.backend, args.nonstream_rpc)
        uvloop.run(serve_http(app, args.host, args.port, args.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
