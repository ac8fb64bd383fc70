"""The Inference servicer: wire → domain → wire for chat, embeddings, models and tokens.

It decides nothing: it validates what the wire types cannot express, converts, and calls
`corvex_core.serving`, which owns each request's life (admission, engine, settlement,
durability). It sends the final chunk only when serving hands it over, after the charge is
durable.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Sequence
from typing import Any, Final, TypeAlias

from corvex.v1 import inference_pb2, inference_pb2_grpc
from corvex_core import errors, telemetry
from corvex_core.catalogue import Catalogue, Served
from corvex_core.engines.base import ChatMessage, EmbedInput, FinishReason, SamplingOptions
from corvex_core.lifecycle import CallKind
from corvex_core.records import Charged
from corvex_core.servicers import credentials
from corvex_core.servicers.metadata import response_metadata
from corvex_core.serving import MAX_EMBED_INPUTS, ChatParams, Finished, Service
from corvex_core.telemetry import CallRecord

# grpc ships no types; this names what the handlers receive.
Context: TypeAlias = Any

CALL_KINDS: Final = {
    "Chat": CallKind.GENERATE,
    "Embed": CallKind.GENERATE,
    "ListModels": CallKind.READ,
    "Tokenize": CallKind.READ,
}
ROLES: Final = frozenset({"system", "developer", "user", "assistant"})
MAX_MESSAGES: Final = 4096
MAX_STOP: Final = 4
_EMBED_CHUNK_VECTORS: Final = 128

_FINISH: Final = {
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: inference_pb2.FINISH_REASON_ABORT,
}


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, service: Service, catalogue: Catalogue) -> None:
        self._service = service
        self._catalogue = catalogue

    # Streams with context.write rather than by yielding, so the interceptor wraps a plain
    # coroutine; the generated stub only knows the generator form.
    async def Chat(  # type: ignore[override]
        self, request: inference_pb2.ChatRequest, context: Context
    ) -> None:
        call = _call()
        key = self._service.authenticate(_secret(context), call)
        run = await self._service.admit_chat(key, chat_params(request), call)
        metadata = response_metadata(call.request_id, run.limit_state)
        if request.final_only:
            context.set_trailing_metadata(metadata)  # sent with the status, at no cost
        else:
            await context.send_initial_metadata(metadata)
        async for event in run.events():
            if isinstance(event, Finished):
                await context.write(_final_chunk(event))
            else:
                chunk = inference_pb2.ChatChunk(text=event.text, completion_tokens=event.num_tokens)
                await context.write(chunk)

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: Context
    ) -> inference_pb2.EmbedResponse:
        call = _call()
        key = self._service.authenticate(_secret(context), call)
        if request.HasField("dimensions") and request.dimensions < 1:
            raise errors.InvalidRequest("dimensions must be at least 1", param="dimensions")
        result = await self._service.embed(
            key,
            request.model,
            embed_inputs(request),
            request.dimensions if request.HasField("dimensions") else None,
            call,
        )
        context.set_trailing_metadata(response_metadata(call.request_id, result.limit_state))
        response = inference_pb2.EmbedResponse(usage=usage(result.charge, result.rate_card_version))
        for index, vector in enumerate(result.embeddings.vectors):
            if index and index % _EMBED_CHUNK_VECTORS == 0:
                await asyncio.sleep(0)  # 2,048 long vectors take ~75 ms to copy: not at once
            response.embeddings.add().values.extend(vector)
        return response

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(
            models=[_model(served) for served in self._catalogue.served()],
            rate_card_version=self._catalogue.rate_card.version,
        )

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: Context
    ) -> inference_pb2.TokenizeResponse:
        call = _call()
        key = self._service.authenticate(_secret(context), call)
        if request.messages and request.text:
            raise errors.InvalidRequest("send either messages or text, not both", param="text")
        messages = chat_messages(request.messages) if request.messages else []
        count, context_length = await self._service.tokenize(
            key, request.model, messages, request.text, call
        )
        return inference_pb2.TokenizeResponse(token_count=count, context_length=context_length)


# ---- wire → domain ---------------------------------------------------------------------------


def _secret(context: Context) -> str | None:
    return credentials.bearer_secret(credentials.authorization(context))


def _call() -> CallRecord:
    """The telemetry record of this call (a detached one outside the interceptor)."""
    return telemetry.current() or CallRecord("", secrets.token_hex(16))


def chat_messages(messages: Sequence[inference_pb2.ChatMessage]) -> list[ChatMessage]:
    if not messages:
        raise errors.InvalidRequest("messages must contain at least one message", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise errors.InvalidRequest(
            f"messages may hold at most {MAX_MESSAGES} messages", param="messages"
        )
    result = []
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise errors.InvalidRequest(
                f"messages[{index}].role must be one of {', '.join(sorted(ROLES))}, "
                f"not {errors.quote(message.role)}",
                param=f"messages[{index}].role",
            )
        name = message.name if message.HasField("name") else None
        result.append(ChatMessage(role=message.role, content=message.content, name=name))
    return result


def chat_params(request: inference_pb2.ChatRequest) -> ChatParams:
    """Validates a chat request's fields; its completion bound is resolved by admission."""
    messages = chat_messages(request.messages)
    if request.HasField("max_tokens") and request.max_tokens < 1:
        raise errors.InvalidRequest("max_tokens must be at least 1", param="max_tokens")
    if request.ignore_eos and not request.HasField("max_tokens"):
        raise errors.InvalidRequest("ignore_eos needs max_tokens", param="ignore_eos")
    temperature = _optional_range(request, "temperature", 0.0, 2.0)
    top_p = _optional_range(request, "top_p", 0.0, 1.0)
    if top_p is not None and top_p == 0.0:
        raise errors.InvalidRequest("top_p must be greater than 0", param="top_p")
    if len(request.stop) > MAX_STOP:
        raise errors.InvalidRequest(f"stop may hold at most {MAX_STOP} strings", param="stop")
    if any(not s for s in request.stop):
        raise errors.InvalidRequest("stop strings must not be empty", param="stop")
    sampling = SamplingOptions(
        max_tokens=0,  # the admitted bound is set by serving (admit_chat)
        temperature=temperature,
        top_p=top_p,
        stop=tuple(request.stop),
        seed=request.seed if request.HasField("seed") else None,
        presence_penalty=_optional_range(request, "presence_penalty", -2.0, 2.0),
        frequency_penalty=_optional_range(request, "frequency_penalty", -2.0, 2.0),
        ignore_eos=request.ignore_eos,
    )
    return ChatParams(
        model=request.model,
        messages=messages,
        max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
        sampling=sampling,
        whole=request.final_only,
    )


def embed_inputs(request: inference_pb2.EmbedRequest) -> list[EmbedInput]:
    if not request.inputs:
        raise errors.InvalidRequest("input must not be empty", param="input")
    if len(request.inputs) > MAX_EMBED_INPUTS:
        raise errors.InvalidRequest(
            f"input may hold at most {MAX_EMBED_INPUTS} items", param="input"
        )
    result = []
    for item in request.inputs:
        if item.HasField("tokens"):
            if not item.tokens.ids:
                raise errors.InvalidRequest("token inputs must not be empty", param="input")
            result.append(EmbedInput(token_ids=tuple(item.tokens.ids)))
        elif item.text:
            result.append(EmbedInput(text=item.text))
        else:
            raise errors.InvalidRequest("input strings must not be empty", param="input")
    return result


def _optional_range(message: Any, field: str, low: float, high: float) -> float | None:
    if not message.HasField(field):
        return None
    value = float(getattr(message, field))
    if not math.isfinite(value) or not low <= value <= high:
        raise errors.InvalidRequest(f"{field} must be between {low:g} and {high:g}", param=field)
    return value


# ---- domain → wire ---------------------------------------------------------------------------


def _final_chunk(finished: Finished) -> inference_pb2.ChatChunk:
    delta = finished.delta
    return inference_pb2.ChatChunk(
        text=delta.text,
        completion_tokens=delta.num_tokens,
        finish_reason=_FINISH[delta.finish_reason or FinishReason.ABORT],
        usage=usage(finished.charge, finished.rate_card_version),
    )


def usage(charge: Charged | None, rate_card_version: str) -> inference_pb2.Usage:
    if charge is None:
        return inference_pb2.Usage(rate_card_version=rate_card_version)
    return inference_pb2.Usage(
        prompt_tokens=charge.prompt_tokens,
        completion_tokens=charge.completion_tokens,
        total_tokens=charge.prompt_tokens + charge.completion_tokens,
        cached_prompt_tokens=charge.cached_prompt_tokens,
        cost_nano_usd=charge.cost_nano,
        rate_card_version=charge.rate_card_version,
    )


def _model(served: Served) -> inference_pb2.Model:
    rate = served.rate
    return inference_pb2.Model(
        id=rate.id,
        display_name=rate.name,
        owned_by=rate.owned_by,
        created=rate.listed_unix_s,
        card_path=rate.card_path,
        input_usd_per_million=rate.input_usd_per_million,
        output_usd_per_million=rate.output_usd_per_million,
        currency="USD",
        context_length=rate.context_length,
        engine=served.engine.kind,
        supports_embeddings=served.engine.supports_embeddings,
    )
