"""Logging set-up shared by the core and the edge: JSON lines for machines, text for people.

`extra={...}` fields given to a log call become fields of the JSON line, so a request's log
line carries its request id, key id, model, tokens and cost as data. Secrets are never passed
to a logger; key ids are.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Final

import msgspec

_STANDARD: Final = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_encoder = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self._process = process
        self._second = -1  # the whole second whose "YYYY-MM-DDTHH:MM:SS" is `_stamp`
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        # Every request writes one of these lines (in the core and in the edge): what is made
        # once a second, or is known not to be an extra, is not worked out again per line.
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        entry: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "process": self._process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and k[:1] != "_"})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(entry).decode()


class TextFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__(f"%(asctime)s {process} %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


def setup(*, process: str, level: str = "info", fmt: str = "auto") -> None:
    """Routes every logger to stderr in the chosen format. `fmt` "auto": text on a terminal."""
    trim_records()
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process) if use_json else TextFormatter(process))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def trim_records() -> None:
    """Log records without what no line of ours prints: the calling file, line and function
    (a walk up the stack), and the thread's and process's names. This is the logging HOWTO's
    "Optimization" list; each is worked out for every request's line otherwise."""
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
