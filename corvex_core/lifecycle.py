"""Lifecycle: whether the core takes new work, and the streams it is serving.

Draining (SIGTERM) and a failed journal both stop admission here, so every servicer refuses
new work the same way. The streams in flight are tracked so a drain can wait for them, and
abort in their engines whatever is still running when the grace period ends; aborted streams
still end with a final chunk and a settled charge.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from corvex_core import errors
from corvex_core.engines.base import Engine


class Lifecycle:
    def __init__(self) -> None:
        self._refusal: str | None = None
        self._streams: dict[str, Engine] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def accepting(self) -> bool:
        return self._refusal is None

    @property
    def refusal(self) -> str | None:
        """Why new work is refused, or None while accepting."""
        return self._refusal

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def stop_accepting(self, reason: str) -> None:
        """From now on new requests fail with SERVICE_UNAVAILABLE and this sentence."""
        if self._refusal is None:
            self._refusal = reason

    def start_accepting(self) -> None:
        self._refusal = None

    def check_accepting(self) -> None:
        if self._refusal is not None:
            raise errors.ServiceUnavailable(self._refusal, retry_after_s=1.0)

    @contextlib.contextmanager
    def stream(self, engine: Engine, request_id: str) -> Iterator[None]:
        self._streams[request_id] = engine
        self._idle.clear()
        try:
            yield
        finally:
            del self._streams[request_id]
            if not self._streams:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Waits until no stream is in flight. Returns False if the timeout came first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def abort_all(self) -> int:
        """Aborts every stream in flight in its engine. Returns how many."""
        streams = list(self._streams.items())
        for request_id, engine in streams:
            await engine.abort(request_id)
        return len(streams)
