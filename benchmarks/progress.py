"""A one-line progress indicator on stderr, rewritten in place while a run goes on, so that
long runs show they are alive without scrolling. Off when stderr is not a terminal."""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

_INTERVAL_S = 0.2


class Progress:
    """Call `update` as often as you like; it redraws at most five times a second."""

    def __init__(self, label: str, *, enabled: bool | None = None, stream: TextIO = sys.stderr):
        self._label = label
        self._stream = stream
        self._enabled = stream.isatty() if enabled is None else enabled
        self._started = time.monotonic()
        self._drawn_at = 0.0

    def update(self, done: int, total: int, errors: int, deadline_s: float) -> None:
        now = time.monotonic()
        if not self._enabled or now - self._drawn_at < _INTERVAL_S:
            return
        self._drawn_at = now
        elapsed = now - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        share = max(done / total if total else 0.0, elapsed / deadline_s if deadline_s else 0.0)
        bar = "#" * int(min(share, 1.0) * 20)
        line = (
            f"{self._label} [{bar:<20}] {done} req  {rate:,.0f} req/s  "
            f"errors {errors}  {elapsed:.1f}s"
        )
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self._stream.write("\r" + line[:width].ljust(width))
        self._stream.flush()

    def close(self) -> None:
        if self._enabled:
            self._stream.write("\r\033[K")
            self._stream.flush()
