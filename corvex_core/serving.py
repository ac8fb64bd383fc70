"""Serving: the life of one request, from the caller's key to its durable charge.

It authenticates the key, finds the served model (the key's workspace's own reserved endpoint,
or the shared fleet's catalogue model), renders and counts the prompt, admits the
request (metering), runs it on the engine, settles it exactly once however it ends (finished,
aborted, failed, client gone), and makes the charge durable before the result is final. It
records what it learns on the call's telemetry record. Servicers only convert wire ⇄ the types
here; they decide nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Final

import msgspec

from corvex.quoting import quote
from corvex_core import errors
from corvex_core.catalogue import Catalogue, Served
from corvex_core.cluster.shipper import ChargeLost, ChargeUnconfirmed
from corvex_core.engines.base import (
    ChatContext,
    ChatMessage,
    Delta,
    Embeddings,
    EmbedInput,
    Engine,
    EngineRequestError,
    EngineUnavailableError,
    FinishReason,
    Prompt,
    Sampling,
    SamplingOptions,
    ToolCallDelta,
)
from corvex_core.engines.request_checks import check_token_ids
from corvex_core.journal import JournalError
from corvex_core.lifecycle import Lifecycle
from corvex_core.limits import LimitState
from corvex_core.metering import Metering, NeedsLease, Ticket
from corvex_core.records import Charged
from corvex_core.reserved import EndpointEngines, EndpointView
from corvex_core.state import ApiKey
from corvex_core.telemetry import CallRecord

# OpenAI's bounds for one embeddings request: 2,048 inputs, 300,000 tokens in all.
MAX_EMBED_INPUTS: Final = 2048
MAX_EMBED_TOKENS: Final = 300_000
# Text counted or rendered between two turns of the event loop, so one large request does not
# stall every other stream (a few ms of work each).
YIELD_EVERY_CHARS: Final = 65_536

Durable = Callable[[], Awaitable[None]]
# Postgres mode with charges committed there: returns once this charge is.
Confirm = Callable[[Charged], Awaitable[None]]


class ChatParams(msgspec.Struct, frozen=True):
    """A validated chat request. `max_tokens` (per choice) None: as many as it may afford."""

    model: str
    messages: list[ChatMessage]
    max_tokens: int | None
    sampling: Sampling
    context: ChatContext = ChatContext()
    # The caller wants each choice whole: no delta before its final one.
    whole: bool = False


class CompletionParams(msgspec.Struct, frozen=True):
    """A validated completions request: a plain prompt (text or token ids), no template."""

    model: str
    prompt: str | tuple[int, ...]
    max_tokens: int | None
    sampling: Sampling
    whole: bool = False


class Finished(msgspec.Struct, frozen=True):
    """The end of a generation, produced only once its charge is durable: the request's last
    delta (with `whole`, one delta per choice holding all of it), its charge (None when
    nothing was billable) and how many of its tokens were reasoning."""

    deltas: list[Delta]
    charge: Charged | None
    rate_card_version: str
    reasoning_tokens: int


class EmbedResult(msgspec.Struct, frozen=True):
    embeddings: Embeddings
    charge: Charged | None
    rate_card_version: str
    limit_state: LimitState


class Service:
    """What the Inference servicer calls. One per core."""

    def __init__(
        self,
        catalogue: Catalogue,
        meter: Metering,
        lifecycle: Lifecycle,
        durable: Durable,
        reserved: EndpointEngines | None = None,
        *,
        confirm: Confirm | None = None,
    ) -> None:
        self._catalogue = catalogue
        self._meter = meter
        self._lifecycle = lifecycle
        self._durable = durable
        self._reserved = reserved
        self._confirm = confirm

    async def authenticate(self, secret: str | None, call: CallRecord) -> ApiKey:
        try:
            key = self._meter.authenticate(secret)
        except errors.InvalidApiKey as refused:
            # A key made on another core a moment ago is looked up once (postgres mode).
            if not await self._meter.find_key(refused):
                raise
            key = self._meter.authenticate(secret)
        call.key_id, call.workspace_id = key.id, key.workspace_id
        return key

    def endpoints_of(self, key: ApiKey) -> list[EndpointView]:
        """The key's workspace's reserved endpoints (what its model list adds)."""
        return self._reserved.views(key.workspace_id) if self._reserved is not None else []

    def lookup(self, key: ApiKey, model: str, call: CallRecord) -> Served:
        """The key's workspace's own reserved endpoint by that id, else the shared fleet's
        model. Another workspace's endpoint id is not found, like any unknown model."""
        served = None
        if self._reserved is not None:
            served = self._reserved.lookup(key.workspace_id, model)
        if served is None:
            served = self._catalogue.lookup(model)
        call.model = served.label  # only catalogue ids become metric labels
        return served

    async def admit_chat(self, key: ApiKey, params: ChatParams, call: CallRecord) -> Generation:
        """Renders, counts and admits a chat request; raises the error that refuses it."""
        served = self.lookup(key, params.model, call)
        with engine_errors():
            prompt = await served.engine.render_chat(params.messages, params.context)
        return await self._admit(
            key,
            served,
            prompt,
            params.max_tokens,
            params.sampling,
            params.whole,
            call,
            prompt_param="messages",
        )

    async def admit_completion(
        self, key: ApiKey, params: CompletionParams, call: CallRecord
    ) -> Generation:
        """Tokenizes and admits a completions request; raises the error that refuses it."""
        served = self.lookup(key, params.model, call)
        with engine_errors():
            prompt = await served.engine.render_completion(params.prompt)
        return await self._admit(
            key,
            served,
            prompt,
            params.max_tokens,
            params.sampling,
            params.whole,
            call,
            prompt_param="prompt",
        )

    async def _admit(
        self,
        key: ApiKey,
        served: Served,
        prompt: Prompt,
        max_tokens: int | None,
        sampling: Sampling,
        whole: bool,
        call: CallRecord,
        *,
        prompt_param: str,
    ) -> Generation:
        hold_id = "hold_" + secrets.token_hex(12)
        ticket = await self._admitted(
            key,
            served,
            hold_id,
            prompt_tokens=prompt.num_tokens,
            max_tokens=max_tokens,
            choices=sampling.n,
            context_param=prompt_param,
        )
        options = sampling.bounded(ticket.max_tokens)
        return Generation(self, served, ticket, hold_id, prompt, options, whole, call)

    async def embed(
        self,
        key: ApiKey,
        model: str,
        inputs: Sequence[EmbedInput],
        dimensions: int | None,
        call: CallRecord,
    ) -> EmbedResult:
        served = self.lookup(key, model, call)
        engine = served.engine
        if not engine.supports_embeddings:
            raise errors.InvalidRequest(
                f"The model {quote(model)} does not produce embeddings.", param="model"
            )
        with engine_errors():
            counts = await _count_inputs(engine, inputs)
        _check_embed_sizes(counts, served.rate.context_length)
        ticket = await self._admitted(
            key,
            served,
            "hold_" + secrets.token_hex(12),
            prompt_tokens=sum(counts),
            max_tokens=0,
            context_param=None,
        )
        used = 0
        try:
            with engine_errors():
                result = await engine.embed(inputs, dimensions)
            used = result.prompt_tokens
        finally:
            charge = self._settle(ticket, call, prompt_tokens=used, completion_tokens=0)
        await self._make_durable(charge)
        return EmbedResult(result, charge, served.rate_card_version, ticket.limit_state)

    async def tokenize(
        self, key: ApiKey, model: str, messages: Sequence[ChatMessage], text: str, call: CallRecord
    ) -> tuple[int, int]:
        """Tokens of a conversation (after the chat template) or of a text, and the context
        length. Not charged, but counted against the key's requests per minute."""
        served = self.lookup(key, model, call)
        self._meter.count_call(key)
        with engine_errors():
            if messages:
                count = (await served.engine.render_chat(messages)).num_tokens
            else:
                count = await served.engine.count_tokens(text)
        return count, served.rate.context_length

    async def _admitted(
        self,
        key: ApiKey,
        served: Served,
        hold_id: str,
        *,
        prompt_tokens: int,
        max_tokens: int | None,
        choices: int = 1,
        context_param: str | None = "messages",
    ) -> Ticket:
        """Admits a request (one synchronous step). In postgres mode, when this core's leases
        cannot cover it, waits for one replenishment and tries once more."""
        admit = functools.partial(
            self._meter.admit,
            key,
            served.rate,
            served.rate_card_version,
            hold_id,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            choices=choices,
            context_param=context_param,
        )
        try:
            return admit()
        except NeedsLease as need:
            await self._meter.replenish(need.shortfall)
            return admit(shortfall=need.shortfall)

    def _settle(
        self,
        ticket: Ticket,
        call: CallRecord,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int = 0,
        finished: bool = True,
    ) -> Charged | None:
        charge = self._meter.settle(
            ticket,
            request_id=call.request_id,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_prompt_tokens=cached_prompt_tokens,
            finished=finished,
        )
        if charge is not None:
            call.prompt_tokens = charge.prompt_tokens
            call.completion_tokens = charge.completion_tokens
            call.cost_nano = charge.cost_nano
        return charge

    async def _make_durable(self, charge: Charged | None) -> None:
        try:
            await self._durable()
            if charge is not None and self._confirm is not None:
                await self._confirm(charge)
        except (ChargeUnconfirmed, ChargeLost) as exc:
            raise errors.ServiceUnavailable(str(exc)) from exc
        except JournalError as exc:
            raise errors.ServiceUnavailable(
                "The charge of this request could not be recorded; it was not billed. Retry later."
            ) from exc


class Generation:
    """An admitted chat or completions request. `events()` runs it: the deltas of its choices
    as the engine produces them (none with `whole`), then one `Finished`, once its
    charge is durable. Iterate it to the end or close it; either way it is settled exactly once."""

    def __init__(
        self,
        service: Service,
        served: Served,
        ticket: Ticket,
        hold_id: str,
        prompt: Prompt,
        options: SamplingOptions,
        whole: bool,
        call: CallRecord,
    ) -> None:
        self._service = service
        self._served = served
        self._ticket = ticket
        self._hold_id = hold_id
        self.prompt = prompt
        self._options = options
        self._whole = whole
        self._call = call

    @property
    def limit_state(self) -> LimitState:
        """The key's per-minute limits after this request was admitted."""
        return self._ticket.limit_state

    async def events(self) -> AsyncIterator[Delta | Finished]:
        service, served, whole = self._service, self._served, self._whole
        with service._lifecycle.stream(served.engine, self._hold_id):
            produced = reasoning = 0
            last: Delta | None = None
            held: dict[int, list[Delta]] = {}  # with `whole`: each choice's deltas
            try:
                with engine_errors():
                    stream = served.engine.generate(self._hold_id, self.prompt, self._options)
                    async with contextlib.aclosing(stream):
                        async for delta in stream:
                            if not produced and delta.num_tokens:
                                self._call.first_token_at = time.perf_counter()
                            produced += delta.num_tokens
                            reasoning += delta.reasoning_tokens
                            if whole:
                                held.setdefault(delta.index, []).append(delta)
                            if delta.is_last:
                                last = delta
                                break
                            if not whole:
                                yield delta
            finally:
                # Reached however the stream ends, cancellation included.
                charge = self._settle(produced, last)
            await service._make_durable(charge)
        assert last is not None
        deltas = [fold(held[i]) for i in sorted(held)] if whole else [last]
        yield Finished(deltas, charge, served.rate_card_version, reasoning)

    def _settle(self, produced: int, last: Delta | None) -> Charged | None:
        """The engine's own prompt count is billed when it reports one (it tokenized what it
        ran); otherwise the count admission used."""
        prompt = self._ticket.prompt_tokens
        if last is not None and last.prompt_tokens is not None:
            prompt = last.prompt_tokens
        return self._service._settle(
            self._ticket,
            self._call,
            prompt_tokens=prompt,
            completion_tokens=produced,
            cached_prompt_tokens=last.cached_prompt_tokens if last is not None else 0,
            finished=last is not None and last.finish_reason is not FinishReason.ABORT,
        )


def fold(deltas: list[Delta]) -> Delta:
    """One choice's deltas as one: texts joined, tool-call pieces merged by call, logprobs in
    order, counts summed; the finish and stop reasons, and the request's prompt counts, of
    the last."""
    calls: dict[int, ToolCallDelta] = {}
    for delta in deltas:
        for piece in delta.tool_calls:
            known = calls.get(piece.index)
            calls[piece.index] = (
                piece
                if known is None
                else msgspec.structs.replace(known, arguments=known.arguments + piece.arguments)
            )
    last = deltas[-1]
    return msgspec.structs.replace(
        last,
        text="".join(d.text for d in deltas),
        num_tokens=sum(d.num_tokens for d in deltas),
        reasoning="".join(d.reasoning for d in deltas),
        reasoning_tokens=sum(d.reasoning_tokens for d in deltas),
        tool_calls=tuple(calls[i] for i in sorted(calls)),
        logprobs=tuple(lp for d in deltas for lp in d.logprobs),
        prompt_logprobs=next((d.prompt_logprobs for d in deltas if d.prompt_logprobs), None),
    )


@contextlib.contextmanager
def engine_errors() -> Iterator[None]:
    """Engine errors → the error table: the one place they are mapped."""
    try:
        yield
    except EngineUnavailableError as exc:
        raise errors.EngineUnavailable(str(exc), retry_after_s=exc.retry_after_s) from exc
    except EngineRequestError as exc:
        raise errors.InvalidRequest(str(exc), param=exc.param) from exc


async def _count_inputs(engine: Engine, inputs: Sequence[EmbedInput]) -> list[int]:
    """The tokens of each input (token ids must be the model's), giving the event loop a turn
    every YIELD_EVERY_CHARS of text (2,048 short inputs are counted in one go otherwise:
    ~100 ms)."""
    counts, chars = [], 0
    for item in inputs:
        if item.token_ids is not None:
            check_token_ids(item.token_ids, engine.vocab_size, "input")
            counts.append(len(item.token_ids))
            continue
        text = item.text or ""
        counts.append(await engine.count_tokens(text))
        chars += len(text)
        if chars >= YIELD_EVERY_CHARS:
            chars = 0
            await asyncio.sleep(0)
    return counts


def _check_embed_sizes(counts: list[int], context_length: int) -> None:
    for count in counts:
        if count > context_length:
            raise errors.ContextLengthExceeded(
                prompt_tokens=count, max_tokens=0, context_length=context_length, param="input"
            )
    if sum(counts) > MAX_EMBED_TOKENS:
        raise errors.InvalidRequest(
            f"The inputs hold {sum(counts)} tokens; one request may embed at most "
            f"{MAX_EMBED_TOKENS}. Split them into several requests.",
            param="input",
        )
