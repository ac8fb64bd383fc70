"""The edge's two ways to the core (edge.core_transport): requests on one Streams call, or a
Chat/Complete call each. A client sees the same answers and pays the same either way."""

from __future__ import annotations

import openai
import pytest

from corvex_ops.admin import Client
from corvex_ops.stack import running_stack
from tests.conftest import ADMIN_TOKEN, MODEL, STACK_CONFIG, new_account

pytestmark = pytest.mark.e2e


def answers(http_url: str, secret: str) -> list[object]:
    with openai.OpenAI(base_url=http_url + "/v1", api_key=secret, max_retries=0) as client:
        whole = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "same"}], max_tokens=9,
            temperature=0, n=2,
        )  # fmt: skip
        streamed = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "same"}], max_tokens=9,
            temperature=0, stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(streamed)
        completion = client.completions.create(
            model=MODEL, prompt="Once upon", max_tokens=5, temperature=0
        )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert whole.usage is not None and usage is not None and completion.usage is not None
    return [
        [c.message.content for c in whole.choices],
        whole.usage.model_extra["cost_nano_usd"],
        text,
        usage.model_extra["cost_nano_usd"],
        completion.choices[0].text,
        completion.usage.model_extra["cost_nano_usd"],
    ]


def test_both_transports_answer_and_charge_alike() -> None:
    seen = {}
    for transport in ("streams", "calls"):
        config = {**STACK_CONFIG, "edge": {"core_transport": transport}}
        with running_stack(config=config) as stack:
            admin = Client(stack.grpc_address, ADMIN_TOKEN)
            account = new_account(admin, credits_cents=100)
            admin.close()
            seen[transport] = answers(stack.http_url, account.secret)
    assert seen["streams"] == seen["calls"]
