"""Starting the real core and edge as processes, for `corvex serve`, the drift gate, the
end-to-end tests and the benchmarks, so that all of them run the same thing users run.

Each process is `python -m corvex_cli core|edge` with a ready file; a launch waits until the
process has written it (it is then serving) and reports the tail of its log if it died.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec

READY_TIMEOUT_S = 60.0


class StackError(Exception):
    """A process of the stack did not start; the message holds the end of its log."""


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    ready: dict[str, Any]
    log_path: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def signal(self, sig: signal.Signals) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait; SIGKILL if it does not exit in time. Returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


def _client_host(listen_host: str) -> str:
    """Where a local client reaches a server listening on `listen_host`."""
    return "127.0.0.1" if listen_host in ("0.0.0.0", "::", "") else listen_host


@dataclass
class Stack:
    core: Process
    edge: Process | None
    admin_token: str | None
    data_dir: Path
    workdir: Path
    processes: list[Process] = field(default_factory=list)

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.core.ready['grpc_port']}"

    @property
    def http_url(self) -> str:
        assert self.edge is not None, "the stack was started without an edge"
        return f"http://127.0.0.1:{self.edge.ready['http_port']}"

    @property
    def metrics_url(self) -> str | None:
        port = self.core.ready.get("metrics_port")
        return f"http://127.0.0.1:{port}" if port else None

    @property
    def edge_metrics_url(self) -> str | None:
        port = self.edge.ready.get("metrics_port") if self.edge else None
        return f"http://127.0.0.1:{port}" if port else None

    def stop(self, timeout_s: float = 60.0) -> dict[str, int]:
        """Stops the edge first (no new requests), then the core (which drains)."""
        codes = {}
        for process in reversed(self.processes):
            codes[process.name] = process.stop(timeout_s)
        return codes


def _wait_ready(
    name: str, popen: subprocess.Popen[bytes], ready: Path, log: Path | None
) -> dict[str, Any]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready.exists():
            result: dict[str, Any] = json.loads(ready.read_text())
            return result
        if popen.poll() is not None:
            break
        time.sleep(0.02)
    else:
        popen.kill()
    popen.wait()
    tail = log.read_text(errors="replace")[-4000:] if log else "(see the output above)"
    raise StackError(f"{name} did not start (exit code {popen.returncode}):\n{tail}")


def launch(
    name: str,
    args: list[str],
    *,
    workdir: Path,
    env: Mapping[str, str] | None = None,
    log_to_file: bool = True,
    cwd: Path | None = None,
    module: str = "corvex_cli",
) -> Process:
    """Starts `python -m <module> <args>` (by default the `corvex` command) and waits until
    it wrote its ready file."""
    ready = workdir / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log" if log_to_file else None
    log_file: IO[bytes] | None = log_path.open("ab") if log_path else None
    try:
        popen = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--ready-file", str(ready)],
            stdout=log_file if log_file else None,
            stderr=subprocess.STDOUT if log_file else None,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            # Its own session: a Ctrl-C at the terminal reaches only the supervisor, which then
            # stops the stack in order.
            start_new_session=True,
        )
    finally:
        if log_file:
            log_file.close()
    return Process(name, popen, _wait_ready(name, popen, ready, log_path), log_path)


def command_line(command: str, **flags: object) -> list[str]:
    """`command --flag value ...` for the flags that are set (None: left to the config)."""
    args = [command]
    for name, value in flags.items():
        if value is not None and value != "":
            args += ["--" + name.replace("_", "-"), str(value)]
    return args


@contextlib.contextmanager
def running_stack(
    *,
    rate_card: str | None = None,
    config: Mapping[str, Any] | None = None,
    config_path: str | None = None,
    data_dir: Path | None = None,
    core_port: int = 0,
    edge_port: int | None = 0,
    metrics_port: int | None = 0,
    edge_metrics_port: int | None = 0,
    host: str = "127.0.0.1",
    edge_host: str = "127.0.0.1",
    admin_token: str | None = "test-admin-token",
    env: Mapping[str, str] | None = None,
    log_to_file: bool = True,
) -> Iterator[Stack]:
    """A core (and an edge unless edge_port is None) on loopback; stopped on exit.

    `config` is written as the YAML config file (e.g. zero engine timings for tests);
    `config_path` names an existing one instead. Ports default to 0 (any free port);
    `metrics_port=None` (`edge_metrics_port=None`) leaves the core's (edge's) metrics port to
    the configuration.
    """
    with tempfile.TemporaryDirectory(prefix="corvex-stack-") as tmp:
        workdir = Path(tmp)
        if config is not None:
            config_path = str(workdir / "corvex.yaml")
            Path(config_path).write_bytes(msgspec.yaml.encode(dict(config)))
        data = data_dir or workdir / "data"
        common = {"config": config_path}
        core_args = command_line(
            "core", **common, host=host, port=core_port, data_dir=data,
            admin_token=admin_token, metrics_port=metrics_port, rate_card=rate_card,
        )  # fmt: skip
        stack_processes: list[Process] = []
        try:
            core = launch("core", core_args, workdir=workdir, env=env, log_to_file=log_to_file)
            stack_processes.append(core)
            edge = None
            if edge_port is not None:
                edge_args = command_line(
                    "edge", **common, host=edge_host, port=edge_port,
                    core=f"{_client_host(host)}:{core.ready['grpc_port']}",
                    metrics_port=edge_metrics_port,
                )  # fmt: skip
                edge = launch("edge", edge_args, workdir=workdir, env=env, log_to_file=log_to_file)
                stack_processes.append(edge)
            stack = Stack(core, edge, admin_token, data, workdir, stack_processes)
            yield stack
        finally:
            for process in reversed(stack_processes):
                process.stop()
