"""The one error middleware, on an application of routes that raise: every exception becomes
an OpenAI error body (never text/plain, never internals), telemetry counts the status the
client got, and the connection stays open for the next request."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
import httpx2 as httpx
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from gateway import telemetry
from gateway.error_middleware import handle_errors
from gateway.errors import ApiError, BadRequest


async def unexpected(request: web.Request) -> web.Response:
    raise RuntimeError("secret internals at 10.0.0.7")


async def refused(request: web.Request) -> web.Response:
    raise BadRequest("No.", param="n")


async def rpc_failed(request: web.Request) -> web.Response:
    raise grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="down"
    )


async def slow_down(request: web.Request) -> web.Response:
    raise ApiError(
        429,
        "Slow down.",
        kind="rate_limit_exceeded",
        code="rate_limit_exceeded",
        headers={"retry-after": "3"},
    )


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    app = web.Application(middlewares=[telemetry.observe, handle_errors])
    for path, handler in (
        ("/unexpected", unexpected),
        ("/refused", refused),
        ("/rpc", rpc_failed),
        ("/slow", slow_down),
    ):
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            yield client
    finally:
        await runner.cleanup()


def counted(route: str, status: int) -> float:
    labels = {"route": route, "status": str(status)}
    return REGISTRY.get_sample_value("corvex_edge_requests_total", labels) or 0.0


async def test_an_unexpected_exception_is_a_500_that_says_nothing_internal(
    http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    before = counted("/unexpected", 500), counted("/unexpected", 499)
    with caplog.at_level(logging.ERROR):
        answer = await http.get("/unexpected")
    assert answer.status_code == 500
    assert answer.json() == {
        "error": {
            "message": "Internal server error.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert "10.0.0.7" in caplog.text and "10.0.0.7" not in answer.text  # logged, not told
    assert (counted("/unexpected", 500), counted("/unexpected", 499)) == (before[0] + 1, before[1])
    # The same connection serves the next request.
    assert (await http.get("/refused")).status_code == 400


@pytest.mark.parametrize(
    ("path", "status", "body"),
    [
        (
            "/refused",
            400,
            {"message": "No.", "type": "invalid_request_error", "param": "n", "code": None},
        ),
        (
            "/rpc",
            503,
            {
                "message": "The inference service is unreachable right now; retry shortly.",
                "type": "server_error",
                "param": None,
                "code": None,
            },
        ),
        (
            "/slow",
            429,
            {
                "message": "Slow down.",
                "type": "rate_limit_exceeded",
                "param": None,
                "code": "rate_limit_exceeded",
            },
        ),
    ],
)
async def test_raised_errors_become_their_openai_answers(
    http: httpx.AsyncClient, path: str, status: int, body: dict[str, object]
) -> None:
    answer = await http.get(path)
    assert (answer.status_code, answer.json()) == (status, {"error": body})
    if path == "/slow":
        assert answer.headers["retry-after"] == "3"
    assert answer.headers["content-type"] == "application/json"


async def test_aiohttps_own_answers_are_openai_errors(http: httpx.AsyncClient) -> None:
    unknown = await http.get("/nowhere/" + "x" * 5000)
    assert unknown.status_code == 404 and len(unknown.json()["error"]["message"]) < 200
    wrong_method = await http.post("/refused")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "GET,HEAD"
    assert "error" in wrong_method.json()
