"""The litellm SDK against the real stack: a completion, a stream and a tool call with warnings
as errors (a `usage.cost` of the wrong type is a pydantic warning on every call), `usage.cost`
a number, and litellm's own `completion_cost()` reading it for a model its cost map does not
know.

litellm cannot be installed beside the project's pins (every release that takes openai 3
needs boto3, whose botocore wants python-dateutil < 3; the lock holds 4.0.0), so it runs in a
virtualenv of its own (`.venv-test-litellm`, pinned, created on first use like the benchmarks'
tools), driven by a script that prints what it saw.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Final

import pytest

from benchmarks import venvs
from corvex_ops.admin import Client
from corvex_ops.stack import Stack
from tests.conftest import MODEL, new_account

pytestmark = pytest.mark.e2e

VENV: Final = venvs.ROOT / ".venv-test-litellm"
# litellm, and the openai client it drives at the lock's version.
PINS: Final = ("litellm==1.110.2", "openai==3.57.0")
# litellm fetches its cost map from the internet unless told to use the one it ships.
OFFLINE_ENV: Final = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"}

SCRIPT: Final = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.simplefilter("error")
    import litellm

    url, key, model = sys.argv[1:4]
    ask = dict(model="openai/" + model, api_base=url + "/v1", api_key=key, max_tokens=5,
               messages=[{"role": "user", "content": "Hi"}])
    reply = litellm.completion(**ask)
    chunks = list(litellm.completion(**ask, stream=True, stream_options={"include_usage": True}))
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    called = litellm.completion(**{**ask, "max_tokens": 50}, tools=[tool], tool_choice="required")
    print(json.dumps({
        "content": reply.choices[0].message.content,
        "cost": reply.usage.cost,
        "cost_nano_usd": reply.usage.cost_nano_usd,
        "tokens": [reply.usage.prompt_tokens, reply.usage.completion_tokens],
        "completion_cost": litellm.completion_cost(completion_response=reply),
        "streamed_cost": chunks[-1].usage.cost,
        "tool": called.choices[0].message.tool_calls[0].function.name,
        "finish_reason": called.choices[0].finish_reason,
    }))
    """
)


@pytest.fixture(scope="module")
def litellm_python() -> Path:
    python = VENV / "bin" / "python"
    if venvs.installed_version(VENV, "litellm") != PINS[0].partition("==")[2]:
        try:
            venvs.run([sys.executable, "-m", "venv", "--clear", str(VENV)], timeout_s=120)
            venvs.run(
                [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 *PINS],
                timeout_s=venvs.INSTALL_TIMEOUT_S,
            )  # fmt: skip
        except venvs.VenvError as exc:
            pytest.fail(f"litellm could not be installed in {VENV}: {exc}")
    return python


def test_litellm_reads_the_cost_as_a_number_without_warnings(
    stack: Stack, admin: Client, litellm_python: Path
) -> None:
    account = new_account(admin, credits_cents=100)
    out = venvs.run(
        [str(litellm_python), "-c", SCRIPT, stack.http_url, account.secret, MODEL],
        timeout_s=120,
        env={**os.environ, **OFFLINE_ENV},
    )
    seen: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    prompt_tokens, completion_tokens = seen["tokens"]
    assert seen["content"]
    assert seen["cost_nano_usd"] == prompt_tokens * 350 + completion_tokens * 1400
    assert isinstance(seen["cost"], float)
    assert seen["cost"] == seen["cost_nano_usd"] / 10**9 == seen["completion_cost"]
    assert isinstance(seen["streamed_cost"], float)
    assert (seen["tool"], seen["finish_reason"]) == ("get_weather", "tool_calls")
