"""A request body that stops arriving, on a real edge with a short body timeout: the 408
comes, and the connection closes with it instead of draining the rest of the body for
aiohttp's lingering time (10 s) first."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from corvex_ops.stack import Stack, running_stack
from tests.conftest import STACK_CONFIG
from tests.gateway.http_wire import closed_by_peer, connect, read_answer

pytestmark = pytest.mark.e2e

BODY_TIMEOUT_S = 0.3
# Generous against a loaded machine: the test waits for the 408, it does not time it.
WAIT_S = 10.0
# The close follows the 408 in the same turn of the edge's event loop; draining would hold
# the connection 10 s. A bound far from both tells them apart on a loaded machine.
CLOSE_WAIT_S = 2.0


@pytest.fixture(scope="module")
def edge() -> Iterator[Stack]:
    config = {**STACK_CONFIG, "edge": {"body_timeout_s": BODY_TIMEOUT_S}}
    with running_stack(config=config) as stack:
        yield stack


@pytest.mark.parametrize(
    "head",
    [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: e\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"mo',
        # The web app's forms are read under the same bound as the API's bodies.
        b"POST /dashboard/signup HTTP/1.1\r\nHost: e\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nem",
    ],
    ids=["api", "dashboard"],
)
def test_a_body_that_stops_arriving_gets_408_and_the_connection_closes(
    edge: Stack, head: bytes
) -> None:
    sock: socket.socket = connect(edge.http_url)
    with sock:
        sock.settimeout(WAIT_S)
        sock.sendall(head)
        answer = read_answer(sock, bytearray())
        assert answer is not None and answer.status == 408
        assert answer.headers["connection"] == "close"
        assert b"did not arrive" in answer.body
        sock.settimeout(CLOSE_WAIT_S)
        assert closed_by_peer(sock), f"the connection was still open {CLOSE_WAIT_S} s after 408"
