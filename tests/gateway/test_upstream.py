"""The edge's link to the core: the metadata every call carries."""

from __future__ import annotations

from gateway import upstream


def test_metadata_carries_the_key_and_the_request_id() -> None:
    assert upstream.metadata("Bearer corvex-abc", "rid-1") == (
        ("x-request-id", "rid-1"),
        ("authorization", "Bearer corvex-abc"),
    )
    assert upstream.metadata(None, "rid-1") == (("x-request-id", "rid-1"),)
