"""Raw HTTP/1.1 on a socket, for the requests an HTTP client refuses to send (bad bytes,
pipelining, slow or idle connections) and the answers to them."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        return json.loads(self.body)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_answer(sock: socket.socket, buffer: bytearray) -> Answer | None:
    """The next answer on `sock` (None at the end of the connection); `buffer` keeps what was
    read past it."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    buffer[:] = rest[length:]
    return Answer(int(lines[0].split()[1]), headers, rest[:length])


def exchange(url: str, data: bytes, answers: int = 1) -> list[Answer]:
    """Sends `data` on a new connection and reads up to `answers` answers."""
    with connect(url) as sock:
        sock.sendall(data)
        buffer = bytearray()
        found = []
        for _ in range(answers):
            answer = read_answer(sock, buffer)
            if answer is None:
                break
            found.append(answer)
        return found


def closed_by_peer(sock: socket.socket) -> bool:
    """Reads until the server closes (True) or the socket's timeout passes (False)."""
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def post(path: str, body: bytes, *headers: bytes, close: bool = True) -> bytes:
    """A POST with a Content-Length, extra header lines as given (bytes, unchecked)."""
    lines = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: edge", *headers]
    lines.append(b"Content-Length: " + str(len(body)).encode())
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
