"""Password hashing: scrypt (Python's hashlib, OpenSSL underneath) with a random salt per user.

It owns the stored format, `scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>`, so that the
parameters can be raised later and old hashes still verify. It never logs or keeps a password.
Hashing takes tens of milliseconds of CPU on purpose: callers run it off the event loop
(`asyncio.to_thread`; hashlib releases the GIL while it works).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Final

# OWASP's scrypt minimum (N=2^14, r=8, p=5: 16 MiB of memory, 5 passes).
LOG2_N: Final = 14
R: Final = 8
P: Final = 5
_SALT_BYTES: Final = 16
_HASH_BYTES: Final = 32
_MAXMEM: Final = 64 * 1024 * 1024
_PREFIX: Final = "scrypt"
# Verifying an email that has no account costs the same as one that has, so the time of a
# failed sign-in does not tell whether the email is registered.
_DUMMY: Final = (
    "scrypt$14$8$5$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
)


def _scrypt(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=1 << log2_n, r=r, p=p, maxmem=_MAXMEM, dklen=_HASH_BYTES
    )


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(password, salt, LOG2_N, R, P)
    encoded = (base64.b64encode(x).decode() for x in (salt, digest))
    return "$".join((_PREFIX, str(LOG2_N), str(R), str(P), *encoded))


def verify_password(password: str, stored: str | None) -> bool:
    """Whether `password` matches the stored hash. `stored` None (no such user) still spends
    the time of a real check, and fails."""
    prefix, log2_n, r, p, salt, digest = (stored or _DUMMY).split("$")
    assert prefix == _PREFIX, "unknown password hash format"
    found = _scrypt(password, base64.b64decode(salt), int(log2_n), int(r), int(p))
    return stored is not None and hmac.compare_digest(found, base64.b64decode(digest))
