"""Response metadata of the Inference service: the request id and the key's rate-limit state
as OpenAI's `x-ratelimit-*` HTTP headers write it, so the edge forwards it as it is."""

from __future__ import annotations

from typing import Final

from corvex_core.limits import LimitState, Standing

_KINDS: Final = ("requests", "tokens")


def response_metadata(request_id: str, state: LimitState) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", request_id), *limit_metadata(state))


def limit_metadata(state: LimitState) -> tuple[tuple[str, str], ...]:
    """Where the key's per-minute limits stand: on every answer, and on a refusal by them."""
    items = []
    for kind, standing in zip(_KINDS, (state.requests, state.tokens), strict=True):
        if standing is not None:
            items.extend(_headers(kind, standing))
    return tuple(items)


def _headers(kind: str, standing: Standing) -> list[tuple[str, str]]:
    return [
        (f"x-ratelimit-limit-{kind}", str(standing.limit)),
        (f"x-ratelimit-remaining-{kind}", str(standing.remaining)),
        (f"x-ratelimit-reset-{kind}", format_duration(standing.reset_ns)),
    ]


def format_duration(ns: int) -> str:
    """A duration as OpenAI's reset headers write it: "20ms", "1s", "6m0s", "1.5s"."""
    ms = -(-ns // 1_000_000)
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest_ms = divmod(ms, 60_000)
    seconds = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"
