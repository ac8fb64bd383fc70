"""The Inference servicer: converts wire → domain → wire for chat, embeddings, models, tokens.

It decides nothing itself: keys, prices and limits are the meter's, tokens are the engine's.
Its one duty of care is the life of an admitted request: from `admit` on, the request is
settled exactly once however it ends (finished, aborted, failed, client gone), and its final
chunk is sent only after its charge is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Sequence
from typing import Any, Final, TypeAlias

import msgspec

from corvex.v1 import inference_pb2, inference_pb2_grpc
from corvex_core import errors, telemetry
from corvex_core.catalogue import Catalogue, Served
from corvex_core.engines.base import (
    ChatMessage,
    Delta,
    EmbedInput,
    EngineRequestError,
    EngineUnavailableError,
    FinishReason,
    Prompt,
    SamplingOptions,
)
from corvex_core.journal import JournalError
from corvex_core.ledger import ApiKey
from corvex_core.lifecycle import CallKind, Lifecycle
from corvex_core.metering import Meter, Ticket
from corvex_core.records import Charged
from corvex_core.servicers import credentials
from corvex_core.telemetry import CallRecord

log = logging.getLogger(__name__)

# grpc ships no types; this names what the handlers receive.
Context: TypeAlias = Any

ROLES: Final = frozenset({"system", "developer", "user", "assistant"})
MAX_MESSAGES: Final = 4096
MAX_STOP: Final = 4
# OpenAI's bounds for one embeddings request: 2,048 inputs, 300,000 tokens in all.
MAX_EMBED_INPUTS: Final = 2048
MAX_EMBED_TOKENS: Final = 300_000
_EMBED_CHUNK_VECTORS: Final = 128

CALL_KINDS: Final = {
    "Chat": CallKind.GENERATE,
    "Embed": CallKind.GENERATE,
    "ListModels": CallKind.READ,
    "Tokenize": CallKind.READ,
}
_FINISH: Final = {
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: inference_pb2.FINISH_REASON_ABORT,
}


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, catalogue: Catalogue, meter: Meter, lifecycle: Lifecycle) -> None:
        self._catalogue = catalogue
        self._meter = meter
        self._lifecycle = lifecycle

    # Streams with context.write rather than by yielding, so the error interceptor wraps a plain
    # coroutine; the generated stub only knows the generator form.
    async def Chat(  # type: ignore[override]
        self, request: inference_pb2.ChatRequest, context: Context
    ) -> None:
        call = _call()
        key = self._authenticate(context, call)
        served = self._lookup(request.model, call)
        messages, options = chat_inputs(request)
        prompt = await _engine_call(served, served.engine.render_chat(messages))
        hold_id = "req_" + secrets.token_hex(12)
        ticket = self._meter.admit(
            key,
            served.rate,
            served.rate_card_version,
            hold_id,
            prompt_tokens=prompt.num_tokens,
            max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
        )
        with self._lifecycle.stream(served.engine, hold_id):
            final, charge = await self._generate(
                context, served, ticket, hold_id, call, prompt, options, request.final_only
            )
            await self._durable()
            await context.write(
                inference_pb2.ChatChunk(
                    text=final.text,
                    completion_tokens=final.num_tokens,
                    finish_reason=_FINISH[final.finish_reason or FinishReason.ABORT],
                    usage=_usage(charge, served),
                )
            )

    async def _generate(
        self,
        context: Context,
        served: Served,
        ticket: Ticket,
        hold_id: str,
        call: CallRecord,
        prompt: Prompt,
        options: SamplingOptions,
        final_only: bool,
    ) -> tuple[Delta, Charged | None]:
        """Streams all but the last delta (or, with `final_only`, keeps them for the last one);
        settles the ticket however the stream ends."""
        options = _with_max_tokens(options, ticket.max_tokens)
        produced = 0
        last: Delta | None = None
        held: list[str] = []
        try:
            metadata = _response_metadata(ticket, call.request_id)
            if final_only:
                context.set_trailing_metadata(metadata)  # sent with the status, at no cost
            else:
                await context.send_initial_metadata(metadata)
            stream = served.engine.generate(hold_id, prompt, options)
            async with contextlib.aclosing(stream):
                async for delta in stream:
                    if not produced and delta.num_tokens:
                        call.first_token_at = time.perf_counter()
                    produced += delta.num_tokens
                    if delta.finish_reason is not None:
                        last = delta
                        break
                    if final_only:
                        held.append(delta.text)
                    else:
                        await context.write(
                            inference_pb2.ChatChunk(
                                text=delta.text, completion_tokens=delta.num_tokens
                            )
                        )
        except EngineUnavailableError as exc:
            raise errors.EngineUnavailable(str(exc), retry_after_s=exc.retry_after_s) from exc
        except EngineRequestError as exc:
            raise errors.InvalidRequest(str(exc), param=exc.param) from exc
        finally:
            # Reached however the stream ends, cancellation included: settle exactly once.
            charge = self._settle(ticket, call, prompt, produced, last)
        assert last is not None
        if final_only:
            held.append(last.text)
            last = Delta("".join(held), produced, last.finish_reason)
        return last, charge

    def _settle(
        self, ticket: Ticket, call: CallRecord, prompt: Prompt, produced: int, last: Delta | None
    ) -> Charged | None:
        """A request is charged its prompt once it finished or produced a token; a request that
        ended before producing anything (refused, aborted in the queue) is charged nothing."""
        completed = last is not None and last.finish_reason is not FinishReason.ABORT
        charge_prompt = completed or produced > 0
        prompt_tokens = 0
        cached = 0
        if charge_prompt:
            engine_count = last.prompt_tokens if last is not None else None
            prompt_tokens = prompt.num_tokens if engine_count is None else engine_count
            cached = last.cached_prompt_tokens if last is not None else 0
        charge = self._meter.settle(
            ticket,
            request_id=call.request_id,
            prompt_tokens=prompt_tokens,
            completion_tokens=produced,
            cached_prompt_tokens=cached,
        )
        _record_charge(call, charge)
        return charge

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: Context
    ) -> inference_pb2.EmbedResponse:
        call = _call()
        key = self._authenticate(context, call)
        served = self._lookup(request.model, call)
        engine = served.engine
        if not engine.supports_embeddings:
            raise errors.InvalidRequest(
                f"The model `{request.model}` does not produce embeddings.", param="model"
            )
        inputs = embed_inputs(request)
        dimensions = request.dimensions if request.HasField("dimensions") else None
        if dimensions is not None and dimensions < 1:
            raise errors.InvalidRequest("dimensions must be at least 1", param="dimensions")
        counts = [
            len(item.token_ids)
            if item.token_ids is not None
            else await _engine_call(served, engine.count_tokens(item.text or ""))
            for item in inputs
        ]
        for count in counts:
            if count > served.rate.context_length:
                raise errors.ContextLengthExceeded(
                    prompt_tokens=count, max_tokens=0, context_length=served.rate.context_length
                )
        if sum(counts) > MAX_EMBED_TOKENS:
            raise errors.InvalidRequest(
                f"The inputs hold {sum(counts)} tokens; one request may embed at most "
                f"{MAX_EMBED_TOKENS}. Split them into several requests.",
                param="input",
            )
        request_id = call.request_id
        hold_id = "req_" + secrets.token_hex(12)
        ticket = self._meter.admit(
            key,
            served.rate,
            served.rate_card_version,
            hold_id,
            prompt_tokens=sum(counts),
            max_tokens=0,
            context_checked=False,
        )
        used = 0
        try:
            context.set_trailing_metadata(_response_metadata(ticket, request_id))
            result = await _engine_call(served, engine.embed(inputs, dimensions))
            used = result.prompt_tokens
        finally:
            charge = self._meter.settle(
                ticket, request_id=request_id, prompt_tokens=used, completion_tokens=0
            )
            _record_charge(call, charge)
        await self._durable()
        response = inference_pb2.EmbedResponse(usage=_usage(charge, served))
        for index, vector in enumerate(result.vectors):
            if index and index % _EMBED_CHUNK_VECTORS == 0:
                await asyncio.sleep(0)  # 2,048 long vectors take ~75 ms to copy: not at once
            response.embeddings.add().values.extend(vector)
        return response

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> inference_pb2.ListModelsResponse:
        card = self._catalogue.rate_card
        return inference_pb2.ListModelsResponse(
            models=[_model(served) for served in self._catalogue.served()],
            rate_card_version=card.version,
        )

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: Context
    ) -> inference_pb2.TokenizeResponse:
        call = _call()
        key = self._authenticate(context, call)
        served = self._lookup(request.model, call)
        self._meter.count_call(key)
        if request.messages and request.text:
            raise errors.InvalidRequest("send either messages or text, not both", param="text")
        if request.messages:
            prompt = await _engine_call(
                served, served.engine.render_chat(chat_messages(request.messages))
            )
            count = prompt.num_tokens
        else:
            count = await _engine_call(served, served.engine.count_tokens(request.text))
        return inference_pb2.TokenizeResponse(
            token_count=count, context_length=served.rate.context_length
        )

    def _authenticate(self, context: Context, call: CallRecord) -> ApiKey:
        secret = credentials.bearer_secret(credentials.authorization(context))
        api_key = self._meter.authenticate(secret)
        call.key_id, call.workspace_id = api_key.id, api_key.workspace_id
        return api_key

    def _lookup(self, model: str, call: CallRecord) -> Served:
        served = self._catalogue.lookup(model)
        call.model = served.rate.id  # only catalogue ids become metric labels
        return served

    async def _durable(self) -> None:
        try:
            await self._meter.durable()
        except JournalError as exc:
            raise errors.ServiceUnavailable(
                "The charge of this request could not be recorded; it was not billed. Retry later."
            ) from exc


# ---- wire → domain ---------------------------------------------------------------------------


def chat_messages(
    messages: Sequence[inference_pb2.ChatMessage],
) -> list[ChatMessage]:
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


def chat_inputs(request: inference_pb2.ChatRequest) -> tuple[list[ChatMessage], SamplingOptions]:
    """Validates a chat request's fields; `max_tokens` is resolved later by admission."""
    messages = chat_messages(request.messages)
    if request.HasField("max_tokens") and request.max_tokens < 1:
        raise errors.InvalidRequest("max_tokens must be at least 1", param="max_tokens")
    if request.ignore_eos and not request.HasField("max_tokens"):
        raise errors.InvalidRequest("ignore_eos needs max_tokens", param="ignore_eos")
    temperature = _optional_range(request, "temperature", 0.0, 2.0)
    top_p = _optional_range(request, "top_p", 0.0, 1.0)
    if top_p is not None and top_p == 0.0:
        raise errors.InvalidRequest("top_p must be greater than 0", param="top_p")
    presence = _optional_range(request, "presence_penalty", -2.0, 2.0)
    frequency = _optional_range(request, "frequency_penalty", -2.0, 2.0)
    if len(request.stop) > MAX_STOP:
        raise errors.InvalidRequest(f"stop may hold at most {MAX_STOP} strings", param="stop")
    if any(not s for s in request.stop):
        raise errors.InvalidRequest("stop strings must not be empty", param="stop")
    return messages, SamplingOptions(
        max_tokens=1,  # replaced by the admitted bound
        temperature=temperature,
        top_p=top_p,
        stop=tuple(request.stop),
        seed=request.seed if request.HasField("seed") else None,
        presence_penalty=presence,
        frequency_penalty=frequency,
        ignore_eos=request.ignore_eos,
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


def _with_max_tokens(options: SamplingOptions, max_tokens: int) -> SamplingOptions:
    return msgspec.structs.replace(options, max_tokens=max_tokens)


async def _engine_call(served: Served, awaitable: Any) -> Any:
    """Awaits an engine call, mapping engine errors to the error table."""
    try:
        return await awaitable
    except EngineUnavailableError as exc:
        raise errors.EngineUnavailable(str(exc), retry_after_s=exc.retry_after_s) from exc
    except EngineRequestError as exc:
        raise errors.InvalidRequest(str(exc), param=exc.param) from exc


# ---- domain → wire ---------------------------------------------------------------------------


def _call() -> CallRecord:
    """The telemetry record of this call (a detached one outside the interceptor)."""
    return telemetry.current() or CallRecord("", secrets.token_hex(16))


def _record_charge(call: CallRecord, charge: Charged | None) -> None:
    if charge is not None:
        call.prompt_tokens = charge.prompt_tokens
        call.completion_tokens = charge.completion_tokens
        call.cost_nano = charge.cost_nano


def _response_metadata(ticket: Ticket, request_id: str) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", request_id), *ticket.headers.items())


def _usage(charge: Charged | None, served: Served) -> inference_pb2.Usage:
    if charge is None:
        return inference_pb2.Usage(rate_card_version=served.rate_card_version)
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
