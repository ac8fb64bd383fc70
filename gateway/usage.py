"""OpenAI's `usage` object built from the core's `Usage`, with what the request cost."""

from __future__ import annotations

from typing import Any

from corvex.money import format_usd
from corvex.v1 import inference_pb2


def usage_json(usage: inference_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
        # Corvex: what the request cost, exact, in USD, and the rate card it was priced with.
        "cost": format_usd(usage.cost_nano_usd),
        "rate_card_version": usage.rate_card_version,
    }
