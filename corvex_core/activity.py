"""Recent requests per workspace, refusals included, for the dashboard's request log.

Fed by the interceptor when a metered call (Chat, Embed) ends, with what its telemetry record
learnt: request id, key, model, outcome, tokens and cost. Bounded: the last MAX_PER_WORKSPACE
requests of each workspace, in memory only (a restart starts it empty; the usage totals and
every charge are in the journal). It decides nothing and never writes the journal.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Final

import msgspec

from corvex_core.telemetry import CallRecord

MAX_PER_WORKSPACE: Final = 200


class RecentRequest(msgspec.Struct, frozen=True):
    request_id: str
    at_ms: int
    key_id: str
    model: str
    rpc: str
    # "OK" or the ErrorInfo reason that refused or ended it.
    status: str
    prompt_tokens: int
    completion_tokens: int
    cost_nano: int


class Activity:
    def __init__(self, clock_ms: Callable[[], int]) -> None:
        self._clock_ms = clock_ms
        self._by_workspace: dict[str, collections.deque[RecentRequest]] = {}

    def record(self, call: CallRecord, status: str) -> None:
        """Keeps one ended call; calls that never reached a workspace (no key) are not kept."""
        if not call.workspace_id:
            return
        self._keep(
            call.workspace_id,
            RecentRequest(
                request_id=call.request_id,
                at_ms=self._clock_ms(),
                key_id=call.key_id,
                model=call.model,
                rpc=call.rpc,
                status=status,
                prompt_tokens=call.prompt_tokens,
                completion_tokens=call.completion_tokens,
                cost_nano=call.cost_nano,
            ),
        )

    def _keep(self, workspace_id: str, entry: RecentRequest) -> None:
        """Where an ended call goes: this core's memory (a cluster's cores share theirs in
        PostgreSQL, cluster/customers.py)."""
        entries = self._by_workspace.get(workspace_id)
        if entries is None:
            entries = self._by_workspace[workspace_id] = collections.deque(maxlen=MAX_PER_WORKSPACE)
        entries.append(entry)

    def recent(self, workspace_id: str, *, key_id: str = "", limit: int) -> list[RecentRequest]:
        """Newest first, at most `limit`."""
        found: list[RecentRequest] = []
        for entry in reversed(self._by_workspace.get(workspace_id, ())):
            if key_id and entry.key_id != key_id:
                continue
            found.append(entry)
            if len(found) >= limit:
                break
        return found
