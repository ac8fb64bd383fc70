"""Which core serves a request: the edge's view of every core it knows, and calls that go to
the right one.

Each configured core has a channel, its `grpc.health.v1` status (watched as a stream, so a
core that starts draining is taken out at once) and the models it serves (from its
ListModels, read again every `models_refresh_s`). A request goes to a core that is SERVING and
serves its model, the one with the fewest calls in flight from this edge (ties in turn). If
that core refuses it with UNAVAILABLE before sending anything, it is sent once more to
another core, but only when the refusal proves nothing ran there: the core could not be
connected to, or it refused before admitting (`admitted: false` in its ErrorInfo), or its
engine refused (which bills nothing). A request the core admitted is never sent twice, so a
client is never billed twice for one answer. A core that refuses because the model is a
reserved endpoint running on another core names that core (`core` in its ErrorInfo): the
request goes there, and later requests for that model go there first.

`RoutedInference` has the methods of the generated Inference stub, so the route handlers use
it as they would use one channel's stub. Chat and Complete travel on the picked core's Streams
call (`gateway.multiplex`, one per core) or as calls of their own (edge.core_transport).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, Final, Literal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from corvex.v1 import errors_pb2, inference_pb2, inference_pb2_grpc
from gateway import errors
from gateway.multiplex import Multiplexer

log = logging.getLogger(__name__)

WATCH_RETRY_S: Final = 0.5
# Connection failures that prove the request never reached a core.
_UNCONNECTED: Final = ("failed to connect", "connection refused", "connections to all backends")
_SAFE_REASONS: Final = frozenset({errors_pb2.ENGINE_UNAVAILABLE})
# Models (reserved endpoints) remembered as served by one core; the oldest are forgotten.
MAX_HOMES: Final = 10_000

ChannelFactory = Callable[[str], grpc.aio.Channel]
Transport = Literal["streams", "calls"]


class CoreLink:
    """One core as this edge sees it."""

    def __init__(self, address: str, channel: grpc.aio.Channel, transport: Transport) -> None:
        self.address = address
        self.channel = channel
        self.inference = inference_pb2_grpc.InferenceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.streams = Multiplexer(self.inference) if transport == "streams" else None
        # Unknown until the first health answer: tried, so a fresh edge serves at once.
        self.serving: bool | None = None
        self.models: frozenset[str] | None = None
        self.in_flight = 0

    def serves(self, model: str) -> bool:
        return self.models is None or model in self.models

    def generate(self, method: str, request: Any, options: dict[str, Any]) -> Any:
        """Starts a Chat or Complete on this core: on its Streams call if the edge uses one."""
        if self.streams is not None:
            return self.streams.open(request, options["metadata"], options.get("timeout"))
        return getattr(self.inference, method)(request, **options)


class Router:
    """The cores of this edge and their health. `start()` watches them; `close()` stops."""

    def __init__(
        self,
        addresses: Sequence[str],
        channel: ChannelFactory,
        *,
        models_refresh_s: float,
        transport: Transport = "streams",
    ) -> None:
        assert addresses, "an edge needs at least one core"
        self.links = [CoreLink(address, channel(address), transport) for address in addresses]
        self._models_refresh_s = models_refresh_s
        self._turn = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        # Where a core said a model is served (a reserved endpoint runs on one core only).
        self._homes: dict[str, CoreLink] = {}

    async def start(self) -> None:
        for link in self.links:
            self._tasks.append(asyncio.ensure_future(self._watch(link)))
            self._tasks.append(asyncio.ensure_future(self._models(link)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(link.streams.close() for link in self.links if link.streams))
        await asyncio.gather(*(link.channel.close() for link in self.links))

    @property
    def any_serving(self) -> bool:
        return any(link.serving for link in self.links)

    def any_channel(self) -> grpc.aio.Channel:
        """The channel of a serving core (the first), for calls every core answers alike."""
        return next((link for link in self.links if link.serving), self.links[0]).channel

    def pick(self, model: str, exclude: CoreLink | None = None) -> CoreLink:
        """The core for a request for `model`: the one a core named as serving it, else
        serving, serving the model, fewest in flight. With none like that, any other core (its
        answer says why it cannot serve)."""
        home = self._homes.get(model)
        if home is not None and home is not exclude and home.serving is not False:
            return home
        candidates = [link for link in self.links if link is not exclude]
        if not candidates:
            assert exclude is not None
            return exclude
        best = [link for link in candidates if link.serving is not False and link.serves(model)]
        if not best:
            best = [link for link in candidates if link.serving is not False] or candidates
        fewest = min(link.in_flight for link in best)
        tied = [link for link in best if link.in_flight == fewest]
        return tied[next(self._turn) % len(tied)]

    def redirected(self, model: str, error: grpc.aio.AioRpcError) -> CoreLink | None:
        """The core a refusal names as serving `model` (remembered for the next requests), or
        None when it names none this edge knows."""
        details = errors.details_of(error)
        address = details.metadata.get("core", "") if details is not None else ""
        link = next((link for link in self.links if link.address == address), None)
        if link is None:
            self._homes.pop(model, None)
            return None
        if model not in self._homes and len(self._homes) >= MAX_HOMES:
            del self._homes[next(iter(self._homes))]
        self._homes[model] = link
        return link

    async def _watch(self, link: CoreLink) -> None:
        """Follows the core's health (a server stream): SERVING in, anything else out."""
        while True:
            try:
                async for reply in link.health.Watch(health_pb2.HealthCheckRequest(service="")):
                    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                    if serving != link.serving:
                        log.info("core %s is %s", link.address,
                                 "serving" if serving else "not serving")  # fmt: skip
                    link.serving = serving
            except grpc.aio.AioRpcError:
                if link.serving is not False:
                    log.warning("core %s is unreachable", link.address)
                link.serving = False
            await asyncio.sleep(WATCH_RETRY_S)

    async def _models(self, link: CoreLink) -> None:
        while True:
            try:
                reply = await link.inference.ListModels(
                    inference_pb2.ListModelsRequest(), timeout=5
                )
                link.models = frozenset(model.id for model in reply.models)
            except grpc.aio.AioRpcError:
                pass  # health says whether it is there; the models are read again next time
            await asyncio.sleep(self._models_refresh_s)


def retryable(error: grpc.aio.AioRpcError) -> bool:
    """Whether a refusal proves the request did not run (so another core may take it)."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    text = (error.details() or "").lower()
    if any(marker in text for marker in _UNCONNECTED):
        return True
    details = errors.details_of(error)
    if details is None:
        return False
    return details.metadata.get("admitted") == "false" or details.reason in _SAFE_REASONS


class RoutedStream:
    """A server-streaming call (Chat, Complete) that goes once more to another core when the
    first refuses before its first message (see the module docstring)."""

    def __init__(self, router: Router, method: str, request: Any, options: dict[str, Any]):
        self._router = router
        self._method = method
        self._request = request
        self._options = options
        self._received = False
        self._retried = False
        self._link = router.pick(request.model)
        self._call = self._start(self._link)

    def _start(self, link: CoreLink) -> Any:
        call = link.generate(self._method, self._request, self._options)
        link.in_flight += 1
        call.add_done_callback(lambda _: _finished(link))
        return call

    async def _retry_if_refused(self) -> bool:
        """After the first call ended without a message: send it elsewhere if allowed."""
        if self._received or self._retried or not self._call.done():
            return False
        code = await self._call.code()
        if code == grpc.StatusCode.OK:
            return False
        try:
            await self._call.read()
        except grpc.aio.AioRpcError as error:
            if not retryable(error):
                return False
            refusal = error
        else:
            return False
        self._retried = True
        model = self._request.model
        home = self._router.redirected(model, refusal)
        log.info("core %s refused before admitting; sending to %s", self._link.address,
                 home.address if home else "another core")  # fmt: skip
        self._link = home or self._router.pick(model, exclude=self._link)
        self._call = self._start(self._link)
        return True

    async def initial_metadata(self) -> Any:
        metadata = await self._call.initial_metadata()
        if await self._retry_if_refused():
            metadata = await self._call.initial_metadata()
        return metadata

    async def read(self) -> Any:
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError:
            if not await self._retry_if_refused():
                raise
            message = await self._call.read()
        if message is not grpc.aio.EOF:
            self._received = True
        return message

    async def trailing_metadata(self) -> Any:
        return await self._call.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = await self._call.code()
        return code

    async def details(self) -> str:
        details: str = await self._call.details()
        return details

    def done(self) -> bool:
        return bool(self._call.done())

    def cancel(self) -> bool:
        return bool(self._call.cancel())

    def __aiter__(self) -> RoutedStream:
        return self

    async def __anext__(self) -> Any:
        message = await self.read()
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        return message


class RoutedUnary:
    """A unary call (Embed, Tokenize) with the same one retry; await it for its answer."""

    def __init__(self, router: Router, method: str, request: Any, options: dict[str, Any]):
        self._router = router
        self._method = method
        self._request = request
        self._options = options
        self._call: Any = None

    def __await__(self) -> Generator[Any, None, Any]:
        return self._run().__await__()

    async def _run(self) -> Any:
        model = self._request.model
        link = self._router.pick(model)
        try:
            return await self._attempt(link)
        except grpc.aio.AioRpcError as error:
            if not retryable(error):
                raise
            home = self._router.redirected(model, error)
        return await self._attempt(home or self._router.pick(model, exclude=link))

    async def _attempt(self, link: CoreLink) -> Any:
        self._call = getattr(link.inference, self._method)(self._request, **self._options)
        link.in_flight += 1
        try:
            return await self._call
        finally:
            _finished(link)

    async def trailing_metadata(self) -> Any:
        assert self._call is not None, "await the call first"
        return await self._call.trailing_metadata()


def _finished(link: CoreLink) -> None:
    link.in_flight -= 1
    assert link.in_flight >= 0


class RoutedInference:
    """The Inference stub's methods, each call routed by `Router`."""

    def __init__(self, router: Router) -> None:
        self._router = router

    def Chat(self, request: inference_pb2.ChatRequest, **options: Any) -> RoutedStream:
        return RoutedStream(self._router, "Chat", request, options)

    def Complete(self, request: Any, **options: Any) -> RoutedStream:
        return RoutedStream(self._router, "Complete", request, options)

    def Embed(self, request: inference_pb2.EmbedRequest, **options: Any) -> RoutedUnary:
        return RoutedUnary(self._router, "Embed", request, options)

    def Tokenize(self, request: Any, **options: Any) -> RoutedUnary:
        return RoutedUnary(self._router, "Tokenize", request, options)

    def ListModels(
        self, request: inference_pb2.ListModelsRequest, **options: Any
    ) -> Awaitable[inference_pb2.ListModelsResponse]:
        return self._list_models(request, options)

    async def _list_models(
        self, request: inference_pb2.ListModelsRequest, options: dict[str, Any]
    ) -> inference_pb2.ListModelsResponse:
        """Every model some serving core serves (each core's catalogue is the same rate card
        joined with its own engines), read afresh from each."""
        links = [link for link in self._router.links if link.serving is not False]
        if len(links) <= 1:
            link = links[0] if links else self._router.pick("")
            reply: inference_pb2.ListModelsResponse = await link.inference.ListModels(
                request, **options
            )
            return reply
        replies = await asyncio.gather(
            *(link.inference.ListModels(request, **options) for link in links),
            return_exceptions=True,
        )
        answered = [r for r in replies if isinstance(r, inference_pb2.ListModelsResponse)]
        if not answered:
            failure = next(r for r in replies if isinstance(r, BaseException))
            raise failure
        merged = inference_pb2.ListModelsResponse(rate_card_version=answered[0].rate_card_version)
        seen: set[str] = set()
        for reply in answered:
            for model in reply.models:
                if model.id not in seen:
                    seen.add(model.id)
                    merged.models.append(model)
        order = {model.id: i for i, model in enumerate(answered[0].models)}
        merged.models.sort(key=lambda m: (order.get(m.id, len(order)), m.id))
        return merged
