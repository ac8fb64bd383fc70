"""TLS between hosts, shared by core, edge and admin tools: which addresses may go without it,
and reading the PEM files a configuration names (with a message that says which one failed).

Plaintext is the default only on loopback: a core asked to listen elsewhere without a
certificate refuses to start unless told the network encrypts for it (`allow_plaintext`).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Final

MAX_PEM_BYTES: Final = 1024 * 1024


class TlsError(Exception):
    """A certificate or key file cannot be used; the message names it."""


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) can only be reached from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_of(address: str) -> str:
    """The host of "host:port" (IPv6 in brackets)."""
    host, _, _ = address.rpartition(":")
    return host.strip("[]") or address


def read_pem(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read the {what} {path}: {exc.strerror}") from exc
    if len(data) > MAX_PEM_BYTES or b"-----BEGIN" not in data:
        raise TlsError(f"the {what} {path} is not a PEM file")
    return data
