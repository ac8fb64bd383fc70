"""The Inference servicer: wire → domain → wire for chat, completions, embeddings, models
and tokens (the conversions are `servicers.wire`).

It decides nothing: it validates what the wire types cannot express, converts, and calls
`corvex_core.serving`, which owns each request's life (admission, engine, settlement,
durability). It sends the final chunk only when serving hands it over, after the charge is
durable.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeAlias

from corvex.ratecard import RateCard
from corvex.v1 import inference_pb2, inference_pb2_grpc
from corvex_core import errors, telemetry
from corvex_core.catalogue import Catalogue, Served
from corvex_core.engines.base import EmbedInput
from corvex_core.lifecycle import CallKind
from corvex_core.reserved import EndpointView
from corvex_core.servicers import credentials, wire
from corvex_core.servicers.endpoints import offering_pb
from corvex_core.servicers.metadata import response_metadata
from corvex_core.servicers.streams import Multiplexer
from corvex_core.serving import MAX_EMBED_INPUTS, Finished, Generation, Service
from corvex_core.telemetry import CallRecord

# grpc ships no types; this names what the handlers receive.
Context: TypeAlias = Any

CALL_KINDS: Final = {
    "Chat": CallKind.GENERATE,
    "Complete": CallKind.GENERATE,
    "Streams": CallKind.GENERATE,  # each of its requests is admitted as its Chat or Complete
    "Embed": CallKind.GENERATE,
    "ListModels": CallKind.READ,
    "Tokenize": CallKind.READ,
}
_EMBED_CHUNK_VECTORS: Final = 128
_METHOD: Final = "/corvex.v1.Inference/"
Method: TypeAlias = Callable[[Any, Any], Awaitable[Any]]
Guard: TypeAlias = Callable[[str, Method], Method]


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, service: Service, catalogue: Catalogue, guard: Guard) -> None:
        """`guard` wraps a method in what its call goes through (the interceptor's), for the
        requests of a Streams call, which arrive inside that call rather than as calls."""
        self._service = service
        self._catalogue = catalogue
        self._multiplexer = Multiplexer(
            guard(_METHOD + "Chat", self.Chat), guard(_METHOD + "Complete", self.Complete)
        )

    async def Streams(  # type: ignore[override]
        self, request_iterator: AsyncIterator[inference_pb2.StreamsRequest], context: Context
    ) -> None:
        await self._multiplexer.serve(request_iterator, context)

    # Streams with context.write rather than by yielding, so the interceptor wraps a plain
    # coroutine; the generated stub only knows the generator form.
    async def Chat(  # type: ignore[override]
        self, request: inference_pb2.ChatRequest, context: Context
    ) -> None:
        call = _call()
        key = await self._service.authenticate(_secret(context), call)
        run = await self._service.admit_chat(key, wire.chat_params(request), call)
        await _stream(context, run, call, whole=request.final_only, echo=False)

    async def Complete(  # type: ignore[override]
        self, request: inference_pb2.CompleteRequest, context: Context
    ) -> None:
        call = _call()
        key = await self._service.authenticate(_secret(context), call)
        run = await self._service.admit_completion(key, wire.completion_params(request), call)
        await _stream(context, run, call, whole=request.final_only, echo=request.echo)

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: Context
    ) -> inference_pb2.EmbedResponse:
        call = _call()
        key = await self._service.authenticate(_secret(context), call)
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
        response = inference_pb2.EmbedResponse(
            usage=wire.usage(result.charge, result.rate_card_version)
        )
        for index, vector in enumerate(result.embeddings.vectors):
            if index and index % _EMBED_CHUNK_VECTORS == 0:
                await asyncio.sleep(0)  # 2,048 long vectors take ~75 ms to copy: not at once
            response.embeddings.add().values.extend(vector)
        return response

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> inference_pb2.ListModelsResponse:
        card = self._catalogue.rate_card
        models = [_model(served, card) for served in self._catalogue.served()]
        secret = _secret(context)
        if secret is not None:
            # With a key, the workspace's own reserved endpoints too (and only its own).
            key = await self._service.authenticate(secret, _call())
            models.extend(_endpoint_model(view) for view in self._service.endpoints_of(key))
        return inference_pb2.ListModelsResponse(models=models, rate_card_version=card.version)

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: Context
    ) -> inference_pb2.TokenizeResponse:
        call = _call()
        key = await self._service.authenticate(_secret(context), call)
        if bool(request.messages) == bool(request.text):
            raise errors.InvalidRequest("send either messages or text (one of them)", param="text")
        messages = wire.chat_messages(request.messages) if request.messages else []
        count, context_length = await self._service.tokenize(
            key, request.model, messages, request.text, call
        )
        return inference_pb2.TokenizeResponse(token_count=count, context_length=context_length)


async def _stream(
    context: Context, run: Generation, call: CallRecord, *, whole: bool, echo: bool
) -> None:
    """Writes a generation's chunks: one per delta, the request's last with the usage, the
    first with the prompt's token count (and with `echo`, the prompt)."""
    metadata = response_metadata(call.request_id, run.limit_state)
    if whole:
        context.set_trailing_metadata(metadata)  # sent with the status, at no cost
    else:
        await context.send_initial_metadata(metadata)
    first = True
    async for event in run.events():
        if not isinstance(event, Finished):  # a delta: one chunk (every token of a stream)
            message = wire.chunk(event)
            if first:
                _first_chunk(message, run, echo)
                first = False
            await context.write(message)
            continue
        last = len(event.deltas) - 1
        for i, delta in enumerate(event.deltas):
            message = wire.chunk(delta)
            if first:
                _first_chunk(message, run, echo)
                first = False
            if i == last:
                message.usage.CopyFrom(
                    wire.usage(event.charge, event.rate_card_version, event.reasoning_tokens)
                )
            await context.write(message)


def _first_chunk(message: inference_pb2.ChatChunk, run: Generation, echo: bool) -> None:
    """The first chunk carries the prompt's token count (and with `echo`, the prompt)."""
    message.prompt_tokens = run.prompt.num_tokens
    if echo:
        message.prompt_text = run.prompt.text


# ---- wire → domain ---------------------------------------------------------------------------


def _secret(context: Context) -> str | None:
    return credentials.bearer_secret(credentials.authorization(context))


def _call() -> CallRecord:
    """The telemetry record of this call (a detached one outside the interceptor)."""
    return telemetry.current() or CallRecord("", secrets.token_hex(16))


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


# ---- domain → wire ---------------------------------------------------------------------------


def _model(served: Served, card: RateCard) -> inference_pb2.Model:
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
        reserved_offerings=[offering_pb(o) for o in card.offerings_of(rate.id)],
    )


def _endpoint_model(view: EndpointView) -> inference_pb2.Model:
    """A workspace's reserved endpoint as a model of its list: free per token."""
    endpoint = view.endpoint
    return inference_pb2.Model(
        id=endpoint.model_id,
        display_name=endpoint.name,
        owned_by=endpoint.model_id.split("/", 1)[0],
        created=endpoint.created_ms // 1000,
        card_path=view.card_path,
        input_usd_per_million="0.00",
        output_usd_per_million="0.00",
        currency="USD",
        context_length=view.context_length,
        engine=view.engine_kind,
        supports_embeddings=view.supports_embeddings,
        reserved_endpoint=inference_pb2.ReservedEndpointInfo(
            endpoint_id=endpoint.id,
            offering=endpoint.offering_id,
            base_model=endpoint.base_model,
            replicas=endpoint.replicas,
            status=view.status.value,
        ),
    )
