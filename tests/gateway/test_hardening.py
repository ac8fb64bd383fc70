"""Bad input at the real edge → core processes: every one a clean OpenAI-shaped 4xx, none a
500 or text/plain, nothing the client sent (least of all its key) echoed or logged, and the
connection kept wherever HTTP allows. The OpenAI SDK where it can send the request, httpx
where it cannot, raw sockets for bytes no client sends."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import httpx2 as httpx
import openai
import pytest

from corvex_ops.admin import Client
from corvex_ops.stack import Stack
from tests.conftest import MODEL, Account, new_account
from tests.e2e.test_operability import samples, value
from tests.gateway.http_wire import closed_by_peer, connect, exchange, post, read_answer

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
JSON = b"Content-Type: application/json"


@pytest.fixture(scope="module")
def account(admin: Client) -> Account:
    return new_account(admin, credits_cents=1000)


@pytest.fixture
def client(stack: Stack, account: Account) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.http_url + "/v1", api_key=account.secret, max_retries=0)


def body(**fields: object) -> bytes:
    return json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **fields}
    ).encode()


def assert_openai_error(answer: object, status: int) -> dict[str, object]:
    assert isinstance(answer, httpx.Response)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    error: dict[str, object] = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_invalid_utf8_and_deep_nesting_are_400s(stack: Stack, account: Account) -> None:
    headers = {"Authorization": f"Bearer {account.secret}", "Content-Type": "application/json"}
    with httpx.Client(base_url=stack.http_url, headers=headers) as http:
        utf8 = http.post(CHAT, content=body().replace(b'"x"', b'"\xff\xfe"'))
        assert "UTF-8" in str(assert_openai_error(utf8, 400)["message"])
        nested = b"[" * 1000 + b"]" * 1000
        deep = http.post(CHAT, content=body()[:-1] + b',"metadata":' + nested + b"}")
        assert "nested" in str(assert_openai_error(deep, 400)["message"])


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer é".encode(),  # UTF-8 bytes: é is not ASCII
        b"Bearer {key}\xe9",  # a trailing Latin-1 byte after a valid key
        b"Bearer\t{key}",  # a tab: valid in HTTP, not in gRPC metadata
    ],
)
def test_a_key_header_grpc_cannot_carry_is_a_401_that_quotes_nothing(
    stack: Stack, account: Account, authorization: bytes
) -> None:
    secret = account.secret.encode()
    header = b"Authorization: " + authorization.replace(b"{key}", secret)
    [answer] = exchange(stack.http_url, post(CHAT, body(), JSON, header))
    assert answer.status == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"
    assert secret not in answer.body


CANARY = b"corvex-CanaryKeyThatMustNeverBeEchoed0000000000000"
UNPARSABLE = {
    "control character after the key": post(
        CHAT, body(), JSON, b"Authorization: Bearer " + CANARY + b"\x01x"
    ),
    "bad chunk size": b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: e\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz" + CANARY + b"\r\n",
    "1,000 headers": b"GET /v1/models HTTP/1.1\r\nHost: e\r\n"
    + b"".join(b"X-H%d: %s\r\n" % (i, CANARY) for i in range(1000))
    + b"\r\n",
    "header over 8,190 bytes": b"GET /v1/models HTTP/1.1\r\nHost: e\r\nX-Long: "
    + CANARY * 200
    + b"\r\n\r\n",
    "URL over 8,190 bytes": b"GET /" + CANARY * 200 + b" HTTP/1.1\r\nHost: e\r\n\r\n",
    "non-ASCII path": b"GET /v1/mod\xc3\xa9ls/" + CANARY + b" HTTP/1.1\r\nHost: e\r\n\r\n",
    "unknown method": b"FOO@" + CANARY + b" /v1/models HTTP/1.1\r\nHost: e\r\n\r\n",
    "Content-Length with chunked": b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: e\r\n"
    b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\nX-Key: " + CANARY + b"\r\n\r\n0\r\n\r\n",
    "Content-Encoding br": post(CHAT, CANARY, JSON, b"Content-Encoding: br"),
}


@pytest.mark.parametrize("request_bytes", UNPARSABLE.values(), ids=UNPARSABLE.keys())
def test_unparsable_requests_get_openai_errors_that_quote_nothing(
    stack: Stack, request_bytes: bytes
) -> None:
    with connect(stack.http_url) as sock:
        sock.sendall(request_bytes)
        answer = read_answer(sock, bytearray())
        assert answer is not None and answer.status == 400
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        assert CANARY not in answer.body
        # Their framing is lost: the edge closes the connection after answering.
        assert closed_by_peer(sock)


def test_nothing_a_client_sent_reaches_the_edge_log(stack: Stack, account: Account) -> None:
    for request_bytes in UNPARSABLE.values():
        exchange(stack.http_url, request_bytes)
    assert stack.edge is not None
    log = stack.edge.log_text()
    assert CANARY.decode() not in log and account.secret not in log
    assert '"route":"unparsed"' in log


def test_pipelined_requests_all_get_answers_around_an_error(stack: Stack) -> None:
    good = b"GET /health HTTP/1.1\r\nHost: e\r\n\r\n"
    bad = post(CHAT, body().replace(b'"x"', b'"\xff"'), JSON, close=False)
    answers = exchange(stack.http_url, good + bad + good, answers=3)
    assert [a.status for a in answers] == [200, 400, 200]


def edge_requests(stack: Stack, route: str, status: int) -> float:
    assert stack.edge_metrics_url is not None
    found = samples(stack.edge_metrics_url + "/metrics")
    return value(found, "corvex_edge_requests_total", route=route, status=str(status))


def test_an_error_is_counted_as_its_status_not_as_a_client_that_left(stack: Stack) -> None:
    before = {status: edge_requests(stack, CHAT, status) for status in (400, 499, 500)}
    exchange(stack.http_url, post(CHAT, body().replace(b'"x"', b'"\xff"'), JSON))
    after = {status: edge_requests(stack, CHAT, status) for status in (400, 499, 500)}
    assert {s: after[s] - before[s] for s in after} == {400: 1, 499: 0, 500: 0}


def test_model_ids_and_roles_are_bounded_before_the_core(client: openai.OpenAI) -> None:
    for model in ("m" * 9000, "é" * 3000):
        with pytest.raises(openai.BadRequestError) as long_model:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
        assert long_model.value.param == "model"
        assert len(long_model.value.message) < 300
    with pytest.raises(openai.BadRequestError) as long_role:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "r" * 9000, "content": "x"}],  # type: ignore[misc, list-item]
        )
    assert long_role.value.param == "messages[0].role"


def test_only_json_bodies_are_accepted(stack: Stack, account: Account) -> None:
    auth = {"Authorization": f"Bearer {account.secret}"}
    with httpx.Client(base_url=stack.http_url, headers=auth) as http:
        # What `curl -d` sends without -H "Content-Type: application/json".
        form = http.post(
            CHAT,
            content=body(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        error = assert_openai_error(form, 400)
        assert error["code"] == "unsupported_content_type"
        assert "application/json" in str(error["message"])
        charset = http.post(
            CHAT, content=body(), headers={"Content-Type": "application/json; charset=utf-8"}
        )
        assert charset.status_code == 200
        untyped = http.post(CHAT, content=body())
        assert "content-type" not in untyped.request.headers
        assert untyped.status_code == 200


def test_the_core_owns_the_dimensions_bound(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as too_many:
        client.embeddings.create(model=MODEL, input="a", dimensions=70_000)
    assert too_many.value.param == "dimensions"
    assert "between 1 and 1024" in too_many.value.message  # the engine's vector size
    with pytest.raises(openai.BadRequestError) as negative:
        client.embeddings.create(model=MODEL, input="a", dimensions=-1)
    assert negative.value.param == "dimensions"


def test_an_unknown_model_is_worded_the_same_by_every_route(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as retrieved:
        client.models.retrieve("nope/nope")
    with pytest.raises(openai.NotFoundError) as chatted:
        client.chat.completions.create(
            model="nope/nope", messages=[{"role": "user", "content": "x"}]
        )
    assert retrieved.value.body == chatted.value.body
    assert retrieved.value.code == "model_not_found"


def test_metrics_are_served_on_the_ops_port_only(stack: Stack) -> None:
    with pytest.raises(urllib.error.HTTPError) as api_port:
        urllib.request.urlopen(stack.http_url + "/metrics", timeout=5)
    api_port.value.close()
    assert api_port.value.code == 404
    assert edge_requests(stack, "/health", 200) >= 0
    assert stack.edge_metrics_url is not None
    with urllib.request.urlopen(stack.edge_metrics_url + "/metrics", timeout=5) as ops:
        assert b"corvex_edge_requests_total" in ops.read()
