"""OpenAI's `usage` object built from the core's `Usage`, with what the request cost.

`cost` is a JSON number written with the exact decimal digits of the charge (as OpenRouter
sends it, so clients such as litellm read it as the number they type it as), made from the
integer nano-USD and never through a float; `cost_nano_usd` is the same amount as an integer,
for clients that want to add costs up exactly.
"""

from __future__ import annotations

from typing import Any

import msgspec

from corvex.money import format_usd
from corvex.v1 import inference_pb2


def cost_number(nano: int) -> msgspec.Raw:
    """The exact decimal USD text of `nano` as a JSON number ("0.00002065", never 2.065e-05)."""
    return msgspec.Raw(format_usd(nano).encode())


def usage_json(usage: inference_pb2.Usage, *, completion_details: bool = True) -> dict[str, Any]:
    """A generation's usage (chat and completions); `completion_details` adds OpenAI's
    `completion_tokens_details` with the reasoning tokens."""
    body: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }
    if completion_details:
        body["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    body.update(priced(usage))
    return body


def priced(usage: inference_pb2.Usage) -> dict[str, Any]:
    """Corvex's fields of every usage: what the request cost, exact, in USD and in nano-USD,
    and the rate card it was priced with."""
    return {
        "cost": cost_number(usage.cost_nano_usd),
        "cost_nano_usd": usage.cost_nano_usd,
        "rate_card_version": usage.rate_card_version,
    }


def running_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The usage of a chunk of a stream with vLLM's continuous_usage_stats: the prompt and the
    tokens of the chunk's choice so far, as vLLM counts them. No cost: it is known only once
    the request is settled, in the stream's last usage."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
