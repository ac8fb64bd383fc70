"""`corvex edge --workers N`: several edge processes sharing one port.

Each worker is an ordinary `corvex edge` that listens with SO_REUSEPORT, so the kernel spreads
new connections across them; this supervisor picks the port (a free one for port 0, held open
until every worker has bound it), starts the workers, writes the ready file once all are
serving, passes SIGTERM/SIGINT on, and stops all of them if one dies. Worker i serves its
metrics on metrics_port + i (0: any free port; -1: none).
"""

from __future__ import annotations

import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from corvex import readyfile
from corvex_ops.stack import Process, launch


def run(
    base_args: list[str],
    *,
    workers: int,
    host: str,
    port: int,
    metrics_port: int,
    ready_file: str | None,
) -> int:
    assert workers >= 2
    holder = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host, port))
    chosen = holder.getsockname()[1]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started: list[Process] = []
    with tempfile.TemporaryDirectory(prefix="corvex-edge-workers-") as tmp:
        try:
            for index in range(workers):
                metrics = metrics_port + index if metrics_port > 0 else metrics_port
                args = [*base_args, "--port", str(chosen), "--reuse-port",
                        "--metrics-port", str(metrics)]  # fmt: skip
                started.append(
                    launch(f"edge-{index + 1}", args, workdir=Path(tmp), log_to_file=False)
                )
            holder.close()
            if ready_file:
                readyfile.write(
                    ready_file,
                    http_port=chosen,
                    metrics_port=started[0].ready.get("metrics_port", 0),
                )
            print(f"corvex edge: {workers} workers on {host}:{chosen}", file=sys.stderr)
            while not stop.wait(0.5):
                if any(worker.popen.poll() is not None for worker in started):
                    print("corvex edge: a worker exited; stopping the others", file=sys.stderr)
                    return 1
            return 0
        finally:
            holder.close()
            for worker in started:
                worker.stop()
