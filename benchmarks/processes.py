"""Starting and stopping the LiteLLM peer: in its own session, ready when a probe answers, and
stopped by signalling its process group (the proxy and its workers), which only ever holds
what we started. Corvex and the ceilings write ready files and are started by `corvex_ops.stack`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


class LaunchError(Exception):
    """A server did not become ready; the message holds the end of its log."""


@dataclass
class Server:
    name: str
    popen: subprocess.Popen[bytes]
    ready: dict[str, Any]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to its process group (it and its workers), SIGKILL if it lingers."""
        if self.popen.poll() is not None:
            return
        _signal_group(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # The group of a process we started with start_new_session: it and its workers only.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _spawn(name: str, argv: list[str], workdir: Path, env: Mapping[str, str] | None) -> Server:
    log_path = workdir / f"{name}.log"
    log_file: IO[bytes] = log_path.open("ab")
    try:
        popen = subprocess.Popen(
            argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    finally:
        log_file.close()
    return Server(name, popen, {}, log_path)


def _wait(server: Server, probe: Callable[[], dict[str, Any] | None], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready = probe()
        if ready is not None:
            server.ready = ready
            return
        if server.popen.poll() is not None:
            break
        time.sleep(0.05)
    server.stop()
    raise LaunchError(f"{server.name} did not start:\n{server.log_tail()}")


def launch_command(
    name: str,
    argv: list[str],
    probe: Callable[[], dict[str, Any] | None],
    *,
    workdir: Path,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 120.0,
) -> Server:
    """Any command, ready when `probe` returns something (e.g. a health URL answers)."""
    server = _spawn(name, argv, workdir, env)
    _wait(server, probe, timeout_s)
    return server
