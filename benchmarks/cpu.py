"""CPU time of server processes, read from /proc/<pid>/stat (user + system, every thread),
so a benchmark can report CPU per request and per token, which stays steady on a noisy
machine where wall-clock does not. A process tree counts as one server (LiteLLM's workers).
It only reads /proc; it never signals a process."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3 onwards)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rindex(")") + 2 :].split()


def process_times(pid: int, *, reaped_children: bool = False) -> tuple[float, float]:
    """(user, system) CPU seconds of one process, all its threads; zeros if it is gone.

    With `reaped_children`, adds what its exited-and-waited-for children used.
    """
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0, 0.0
    # utime, stime, cutime, cstime are fields 14-17 of proc(5): 11-14 here.
    user, system = int(fields[11]), int(fields[12])
    if reaped_children:
        user, system = user + int(fields[13]), system + int(fields[14])
    return user / _TICKS_PER_S, system / _TICKS_PER_S


def descendants(root: int) -> list[int]:
    """Live processes below `root` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    pending = [root]
    while pending:
        kids = children.get(pending.pop(), [])
        found.extend(kids)
        pending.extend(kids)
    return found


def tree_times(root: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and everything below it, exited children
    included."""
    user, system = process_times(root, reaped_children=True)
    for pid in descendants(root):
        more_user, more_system = process_times(pid)
        user, system = user + more_user, system + more_system
    return user, system


def snapshot(pids: Mapping[str, int]) -> dict[str, tuple[float, float]]:
    """(user, system) CPU seconds so far of each named process tree."""
    return {name: tree_times(pid) for name, pid in pids.items()}


def self_cpu_s() -> float:
    """CPU seconds this process (the load generator) has used."""
    times = os.times()
    return times.user + times.system
