"""The parts of an OpenAI choice, made from the core's ChatChunks: finish and stop reasons, tool
calls, and log probabilities in chat's shape, the legacy completions' shape and vLLM's
prompt_logprobs shape; and the reading of a whole (`final_only`) answer. Shared by the chat and
completions routes and their stream framing (`gateway.sse`); it writes no response itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

import grpc

from corvex.v1 import inference_pb2
from gateway.errors import ApiError

FINISH: Final = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
    # Not one of OpenAI's values: the core was draining and cut the answer short. vLLM's
    # OpenAI server reports the same value.
    inference_pb2.FINISH_REASON_ABORT: "abort",
}
# vLLM's floor for a log probability (JSON has no -inf).
MIN_LOGPROB: Final = -9999.0


def finish_reason(chunk: inference_pb2.ChatChunk) -> str:
    return FINISH.get(chunk.finish_reason, "stop")


def stop_reason(chunk: inference_pb2.ChatChunk) -> str | int | None:
    """vLLM's `stop_reason`: the stop string or token id that ended the choice, else null."""
    which = chunk.WhichOneof("stop_reason")
    if which is None:
        return None
    value: str | int = getattr(chunk, which)
    return value


# ---- tool calls --------------------------------------------------------------------------------


def tool_call_head(piece: inference_pb2.ToolCallDelta) -> dict[str, Any]:
    """A streamed call's first delta, as OpenAI sends it: index, id, type and name, no
    arguments yet."""
    return {
        "index": piece.index,
        "id": piece.id,
        "type": "function",
        "function": {"name": piece.name, "arguments": ""},
    }


def is_head(piece: inference_pb2.ToolCallDelta) -> bool:
    return piece.HasField("id") or piece.HasField("name")


def tool_calls(chunks: Iterable[inference_pb2.ChatChunk]) -> list[dict[str, Any]]:
    """A whole answer's calls, their pieces joined by index."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for piece in chunk.tool_calls:
            call = calls.get(piece.index)
            if call is None:
                call = calls[piece.index] = {
                    "id": "",
                    "type": "function",
                    "function": {"name": "", "arguments": ""},
                }
            if piece.HasField("id"):
                call["id"] = piece.id
            if piece.HasField("name"):
                call["function"]["name"] = piece.name
            call["function"]["arguments"] += piece.arguments
    return [calls[i] for i in sorted(calls)]


# ---- log probabilities ---------------------------------------------------------------------


def _logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(tokens: Sequence[inference_pb2.TokenLogprob]) -> list[dict[str, Any]]:
    """Chat's `logprobs.content`: token, logprob, bytes and the top alternatives of each."""
    return [
        {
            "token": t.token,
            "logprob": _logprob(t.logprob),
            "bytes": _bytes(t.token),
            "top_logprobs": [
                {"token": top.token, "logprob": _logprob(top.logprob), "bytes": _bytes(top.token)}
                for top in t.top
            ],
        }
        for t in tokens
    ]


class LegacyLogprobs:
    """The legacy completions' `logprobs` of one choice, built chunk by chunk: tokens,
    token_logprobs, top_logprobs (a token → logprob object each) and text_offset, the
    position of each token in the choice's text (counted as vLLM does, by the tokens'
    lengths)."""

    def __init__(self) -> None:
        self._offset = 0

    def add(self, tokens: Sequence[inference_pb2.TokenLogprob]) -> dict[str, Any]:
        """The object for `tokens`, the next tokens of the choice."""
        result: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for t in tokens:
            result["tokens"].append(t.token)
            if t.HasField("logprob"):
                result["token_logprobs"].append(_logprob(t.logprob))
                top: dict[str, float] = {}
                for candidate in t.top:
                    top.setdefault(candidate.token, _logprob(candidate.logprob))
                result["top_logprobs"].append(top)
            else:  # a prompt's first token has none
                result["token_logprobs"].append(None)
                result["top_logprobs"].append(None)
            result["text_offset"].append(self._offset)
            self._offset += len(t.token)
        return result


def prompt_logprobs(tokens: Sequence[inference_pb2.TokenLogprob]) -> list[Any]:
    """vLLM's `prompt_logprobs`: per prompt token, null for the first, else token id → logprob,
    rank (1 is the most likely; null when the token is not among the top asked for) and
    decoded token, for the token and its top alternatives."""
    result: list[Any] = []
    for t in tokens:
        if not t.HasField("logprob"):
            result.append(None)
            continue
        entry: dict[str, Any] = {}
        for rank, top in enumerate(t.top, start=1):
            entry.setdefault(
                str(top.token_id),
                {"logprob": _logprob(top.logprob), "rank": rank, "decoded_token": top.token},
            )
        entry.setdefault(
            str(t.token_id),
            {"logprob": _logprob(t.logprob), "rank": None, "decoded_token": t.token},
        )
        result.append(entry)
    return result


# ---- whole answers -----------------------------------------------------------------------------


async def read_whole(call: Any) -> tuple[list[inference_pb2.ChatChunk], inference_pb2.Usage]:
    """A `final_only` answer: one chunk per choice (the request's last with the usage), read to
    the call's status. Returns the choices' chunks in index order."""
    chunks: list[inference_pb2.ChatChunk] = []
    while (chunk := await call.read()) is not grpc.aio.EOF:
        chunks.append(chunk)
    if not chunks or not chunks[-1].HasField("usage") or not all(c.finish_reason for c in chunks):
        raise ApiError(502, "The inference service ended the answer without finishing.")
    usage = chunks[-1].usage
    return sorted(chunks, key=lambda c: c.index), usage
