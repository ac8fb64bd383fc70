"""The edge's connection policy, on a real edge configured with short timeouts: idle and
silent connections are closed, slow request heads and bodies get 408, and beyond the
connection bound a new connection gets 503 at once."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from corvex_ops.stack import Stack, running_stack
from tests.conftest import STACK_CONFIG
from tests.gateway.http_wire import closed_by_peer, connect, exchange, read_answer

pytestmark = pytest.mark.e2e

MAX_CONNECTIONS = 3
# Generous against a loaded machine: the tests wait for an event, they do not time it.
WAIT_S = 10.0
# The idle timeout is the longer, as in production (75 s against 10 s), so that a slow head
# meets the header timeout first.
SHORT_TIMEOUTS = {"idle_timeout_s": 1.0, "header_timeout_s": 0.3, "body_timeout_s": 0.3}


@pytest.fixture(scope="module")
def edge() -> Iterator[Stack]:
    with running_stack(config={**STACK_CONFIG, "edge": SHORT_TIMEOUTS}) as stack:
        yield stack


@pytest.fixture(scope="module")
def bounded_edge() -> Iterator[Stack]:
    """Default timeouts (held connections stay open), few connections."""
    config: dict[str, Any] = {**STACK_CONFIG, "edge": {"max_connections": MAX_CONNECTIONS}}
    with running_stack(config=config) as stack:
        yield stack


@contextlib.contextmanager
def connection(stack: Stack) -> Iterator[socket.socket]:
    sock = connect(stack.http_url)
    sock.settimeout(WAIT_S)
    try:
        yield sock
    finally:
        sock.close()


def test_a_connection_that_never_sends_a_request_is_closed(edge: Stack) -> None:
    with connection(edge) as sock:
        assert closed_by_peer(sock)


def test_an_idle_keep_alive_connection_is_closed(edge: Stack) -> None:
    with connection(edge) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: e\r\n\r\n")
        answer = read_answer(sock, bytearray())
        assert answer is not None and answer.status == 200
        assert closed_by_peer(sock)


def test_a_slow_request_head_gets_408(edge: Stack) -> None:
    with connection(edge) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: e\r\nX-Slow: ")
        answer = read_answer(sock, bytearray())
        assert answer is not None and answer.status == 408
        assert answer.json()["error"]["type"] == "invalid_request_error"
        assert closed_by_peer(sock)


def test_a_slow_request_body_gets_408(edge: Stack) -> None:
    with connection(edge) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: e\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        answer = read_answer(sock, bytearray())
        assert answer is not None and answer.status == 408
        assert "body" in answer.json()["error"]["message"]


def test_beyond_the_bound_a_new_connection_gets_503_at_once(bounded_edge: Stack) -> None:
    with contextlib.ExitStack() as held:
        for _ in range(MAX_CONNECTIONS):
            sock = held.enter_context(connection(bounded_edge))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: e\r\n\r\n")
            answer = read_answer(sock, bytearray())
            assert answer is not None and answer.status == 200  # open, and counted
        with connection(bounded_edge) as refused:
            answer = read_answer(refused, bytearray())
            assert answer is not None and answer.status == 503
            assert answer.headers["retry-after"] == "1"
            assert answer.json()["error"]["type"] == "server_error"
            assert closed_by_peer(refused)
    # Once they are gone (the edge sees them close), connections are served again.
    deadline = time.monotonic() + WAIT_S
    statuses = []
    while time.monotonic() < deadline and statuses[-1:] != [200]:
        [answer] = exchange(bounded_edge.http_url, b"GET /health HTTP/1.0\r\n\r\n")
        statuses.append(answer.status)
    assert statuses[-1] == 200 and set(statuses) <= {200, 503}
