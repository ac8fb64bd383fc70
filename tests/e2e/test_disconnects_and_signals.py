"""Through the real processes: a client that hangs up mid-answer stops the engine's work and is
charged what was produced, and a second SIGTERM during a drain exits at once without damaging
the journal."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from corvex.v1 import accounts_pb2
from corvex_core.journal import Journal
from corvex_ops.admin import Client
from corvex_ops.stack import Stack, running_stack
from tests.conftest import ADMIN_TOKEN, FAST_ENGINE, MODEL, STACK_CONFIG, new_account

pytestmark = pytest.mark.e2e


def config(**engine: Any) -> dict[str, Any]:
    core = {**STACK_CONFIG["core"], "metrics_port": 0, "drain_grace_s": 30}
    core["engines"] = {"default": {**FAST_ENGINE, **engine}}
    return {"core": core}


def running(stack: Stack) -> int:
    assert stack.metrics_url is not None
    with urllib.request.urlopen(stack.metrics_url + "/health", timeout=5) as response:
        return int(json.load(response)["engines"][MODEL]["running"])


def open_request(stack: Stack, secret: str, *, stream: bool) -> socket.socket:
    """Starts a long answer with a raw socket: a stream, read to its third event, or a
    non-streaming request, left to run for ~50 steps (it sends nothing before its end)."""
    host, port = stack.http_url.removeprefix("http://").split(":")
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "a long answer"}],
            "max_tokens": 5000,
            "stream": stream,
            "ignore_eos": True,
        }
    ).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {secret}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    if not stream:
        deadline = time.monotonic() + 5
        while not running(stack) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)
        return sock
    received = b""
    while received.count(b"data: ") < 3:
        received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200")
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_request_in_the_engine(tmp_path: Path, stream: bool) -> None:
    with running_stack(config=config(tpot_ms=10), data_dir=tmp_path / "data") as stack:
        admin = Client(stack.grpc_address, ADMIN_TOKEN)
        account = new_account(admin, credits_cents=1000)
        sock = open_request(stack, account.secret, stream=stream)
        assert running(stack) == 1
        sock.close()
        deadline = time.monotonic() + 5
        while running(stack) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running(stack) == 0
        time.sleep(0.2)  # the settlement follows the abort on the core's loop
        usage = admin.GetUsage(accounts_pb2.GetUsageRequest(workspace_id=account.workspace_id))
        ws = admin.GetWorkspace(accounts_pb2.GetWorkspaceRequest(workspace_id=account.workspace_id))
        admin.close()
    [row] = usage.rows
    # Charged for what was generated before the hang-up, not the 5000 tokens held: a stream
    # read two content chunks; a non-streaming answer ran ~50 steps of 10 ms, all billed though
    # none was sent.
    assert (2 if stream else 20) <= row.completion_tokens < 500
    assert ws.held_nano_usd == 0
    assert ws.balance_nano_usd == 1000 * 10**7 - row.cost_nano_usd


def test_second_sigterm_exits_at_once_and_the_journal_is_intact(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with running_stack(config=config(tpot_ms=10), data_dir=data_dir) as stack:
        admin = Client(stack.grpc_address, ADMIN_TOKEN)
        account = new_account(admin, credits_cents=1000)
        admin.close()
        sock = open_request(
            stack, account.secret, stream=True
        )  # ~50 s of tokens: the drain would wait
        stack.core.signal(signal.SIGTERM)
        time.sleep(0.3)
        assert stack.core.popen.poll() is None, "the first signal drains, it does not exit"
        stack.core.signal(signal.SIGTERM)
        # It exits now, not after draining the stream (which has ~50 s of tokens to go).
        code = stack.core.popen.wait(10)
        sock.close()
        assert code != 0
    recovery = Journal(data_dir).recover()  # raises if the store were damaged
    assert len(recovery.records) >= 3  # the workspace, its credits, the key
