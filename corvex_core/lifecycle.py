"""Lifecycle: which calls the core takes in each of its states, and the streams it is serving.

The core is STARTING until its ledger is recovered and its engines are loaded: nothing is read
or written then, because the state is not yet what the journal says. It is SERVING until a
signal makes it DRAINING (no new generation; account calls still work until the server stops)
or a failed journal write makes it FAILED (nothing, while memory falls back to what the disk
holds) and then READ_ONLY (reads of what is durable work; nothing that writes does).
Every Corvex RPC passes `admit_call` first, so no servicer can forget the rule.

The streams in flight are tracked so a drain can wait for them, and abort in their engines
whatever is still running when the grace period ends; aborted streams still end with a final
chunk and a settled charge.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Iterator
from typing import Final

from corvex_core import errors
from corvex_core.engines.base import Engine


class State(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    FAILED = "failed"
    READ_ONLY = "read_only"


class CallKind(enum.Enum):
    """What a call does, which decides the states that take it."""

    GENERATE = "generate"  # admits a metered request: Chat, Embed
    WRITE = "write"  # changes accounts: journaled
    READ = "read"  # reads state: models, tokens, accounts


# Who takes what. STARTING takes nothing: the ledger is not yet what the journal says.
_TAKES: Final = {
    State.STARTING: frozenset(),
    State.SERVING: frozenset(CallKind),
    State.DRAINING: frozenset({CallKind.WRITE, CallKind.READ}),
    State.FAILED: frozenset(),
    State.READ_ONLY: frozenset({CallKind.READ}),
}
_RETRY_AFTER_S: Final = 1.0


class Lifecycle:
    def __init__(self) -> None:
        self._state = State.STARTING
        self._reason = "The core is starting (recovering its ledger); retry shortly."
        self._streams: dict[str, Engine] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def state(self) -> State:
        return self._state

    @property
    def accepting(self) -> bool:
        """Whether new generation requests are admitted."""
        return self._state is State.SERVING

    @property
    def refusal(self) -> str | None:
        """Why some calls are refused, or None while serving."""
        return None if self._state is State.SERVING else self._reason

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def serving(self) -> None:
        """Recovery and start-up are done."""
        assert self._state is State.STARTING, self._state
        self._state = State.SERVING

    def draining(self, reason: str) -> None:
        """No new generation from now on. A failed core stays failed."""
        if self._state not in (State.FAILED, State.READ_ONLY):
            self._state, self._reason = State.DRAINING, reason

    def failed(self, reason: str) -> bool:
        """Nothing from now on (the journal cannot write), until `read_only`. Returns False if
        the core had failed already, so the caller reports the change of state once."""
        if self._state in (State.FAILED, State.READ_ONLY):
            return False
        self._state, self._reason = State.FAILED, reason
        return True

    def read_only(self) -> None:
        """Memory is back to what the disk holds: reads are served again."""
        assert self._state is State.FAILED, self._state
        self._state = State.READ_ONLY

    def admit_call(self, kind: CallKind) -> None:
        """Raises ServiceUnavailable (with a retry hint) if this state does not take `kind`."""
        if kind not in _TAKES[self._state]:
            failed = self._state in (State.FAILED, State.READ_ONLY)
            retry = None if failed else _RETRY_AFTER_S
            # Nothing was done: an edge may send the request to another core.
            raise errors.ServiceUnavailable(
                self._reason, retry_after_s=retry, metadata={"admitted": "false"}
            )

    @contextlib.contextmanager
    def stream(self, engine: Engine, hold_id: str) -> Iterator[None]:
        self._streams[hold_id] = engine
        self._idle.clear()
        try:
            yield
        finally:
            del self._streams[hold_id]
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
        for hold_id, engine in streams:
            await engine.abort(hold_id)
        return len(streams)
