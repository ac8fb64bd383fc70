"""LangChain's `ChatOpenAI` against the real stack: `bind_tools` gets tool calls it can run,
`with_structured_output` gets the object it asked for (both of its methods)."""

from __future__ import annotations

import pydantic
import pytest
from langchain_openai import ChatOpenAI

from corvex_ops.admin import Client
from corvex_ops.stack import Stack
from tests.conftest import MODEL, new_account

pytestmark = pytest.mark.e2e


class GetWeather(pydantic.BaseModel):
    """The forecast for a city."""

    city: str


class Weather(pydantic.BaseModel):
    city: str
    days: int


@pytest.fixture(scope="module")
def llm(stack: Stack, admin: Client) -> ChatOpenAI:
    account = new_account(admin, credits_cents=1000)
    return ChatOpenAI(
        model=MODEL,
        base_url=stack.http_url + "/v1",
        api_key=account.secret,
        max_retries=0,
        max_tokens=200,
    )


def test_bind_tools_gets_tool_calls(llm: ChatOpenAI) -> None:
    reply = llm.bind_tools([GetWeather], tool_choice="required").invoke("Weather in Paris?")
    (call,) = reply.tool_calls
    assert call["name"] == "GetWeather" and call["id"]
    assert GetWeather.model_validate(call["args"])
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] > 0


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_gets_the_object(llm: ChatOpenAI, method: str) -> None:
    structured = llm.with_structured_output(Weather, method=method)
    assert isinstance(structured.invoke("Weather in Oslo for 2 days"), Weather)
