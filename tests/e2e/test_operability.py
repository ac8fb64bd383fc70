"""What an operator sees: metrics that move, logs without secrets, request ids that can be
followed from the edge through the core into the usage record, and readiness that means it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from corvex_core import records
from corvex_core.journal import Journal
from corvex_ops.admin import Client
from corvex_ops.stack import running_stack
from tests.conftest import ADMIN_TOKEN, FAST_ENGINE, MODEL, new_account

pytestmark = pytest.mark.e2e


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_logs_and_request_ids(tmp_path: Path) -> None:
    config: dict[str, Any] = {
        "core": {
            "metrics_port": 0,
            "accounts": {"starter_credits_usd": "0"},
            "engines": {"default": FAST_ENGINE},
        }
    }
    with running_stack(config=config, data_dir=tmp_path / "data") as stack:
        assert stack.metrics_url is not None
        admin = Client(stack.grpc_address, ADMIN_TOKEN)
        account = new_account(admin, credits_cents=500)
        broke = new_account(admin, credits_cents=0)
        admin.close()
        before = samples(stack.metrics_url + "/metrics")
        with openai.OpenAI(
            base_url=stack.http_url + "/v1", api_key=account.secret, max_retries=0
        ) as client:
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=[{"role": "user", "content": "trace me"}],
                max_tokens=7,
                extra_body={"ignore_eos": True},
                extra_headers={"x-request-id": "trace-abc-123"},
            )
            assert raw.headers["x-request-id"] == "trace-abc-123"
            assert raw.parse().id == "chatcmpl-trace-abc-123"
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "s"}], max_tokens=3, stream=True
            )
            assert len(list(stream)) > 1
        for secret in (broke.secret, "corvex-NotARealKeyButLooksLikeOne000000000000000"):
            with (
                openai.OpenAI(base_url=stack.http_url + "/v1", api_key=secret, max_retries=0) as c,
                pytest.raises(openai.APIStatusError),
            ):
                c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        after = samples(stack.metrics_url + "/metrics")
        assert stack.edge_metrics_url is not None
        edge = samples(stack.edge_metrics_url + "/metrics")
        core_log = stack.core.log_text()
        assert stack.edge is not None
        edge_log = stack.edge.log_text()

    chat_ok = {"rpc": "Chat", "model": MODEL, "status": "OK"}
    assert (
        value(after, "corvex_requests_total", **chat_ok)
        - value(before, "corvex_requests_total", **chat_ok)
        == 2
    )
    assert value(after, "corvex_tokens_total", model=MODEL, kind="completion") == 10
    assert value(after, "corvex_charged_usd_total", model=MODEL) > 0
    assert value(after, "corvex_credits_added_usd_total", method="starter") == 5.0
    assert value(after, "corvex_rejections_total", reason="insufficient_credits") == 1
    assert value(after, "corvex_time_to_first_token_seconds_count", model=MODEL) == 2
    assert value(after, "corvex_journal_batch_records_count") > 0
    assert (("corvex_engine_running", (("model", MODEL),))) in after  # exported, and idle:
    assert value(after, "corvex_engine_running", model=MODEL) == 0
    assert (
        value(edge, "corvex_edge_requests_total", route="/v1/chat/completions", status="200") == 2
    )
    assert (
        value(edge, "corvex_edge_requests_total", route="/v1/chat/completions", status="401") == 1
    )
    assert value(edge, "corvex_edge_time_to_first_token_seconds_count") == 1

    # No secret ever reaches a log line, valid or not; key ids do.
    for secret in (account.secret, broke.secret, "NotARealKeyButLooksLikeOne"):
        assert secret not in core_log and secret not in edge_log
    assert account.key_id in core_log
    # The request id is in the edge's line, the core's line, and the usage record.
    assert '"request_id":"trace-abc-123"' in core_log
    assert '"request_id":"trace-abc-123"' in edge_log
    charges = [
        r for r in Journal(tmp_path / "data").recover().records if isinstance(r, records.Charged)
    ]
    assert "trace-abc-123" in {c.request_id for c in charges}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def health_status(port: int) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_not_serving_while_engines_load(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "corvex.yaml"
    config.write_text("core:\n  engines:\n    default: {backend: simulated, load_ms: 2000}\n")
    core = subprocess.Popen(
        [sys.executable, "-m", "corvex_cli", "core", "--config", str(config), "--port", str(port),
         "--metrics-port", "-1", "--data-dir", str(tmp_path / "data"), "--admin-token", "t"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = health_status(port)
            if not seen or seen[-1] != status:
                seen.append(status)
            if status == "SERVING":
                break
            time.sleep(0.05)
        assert "NOT_SERVING" in seen and seen[-1] == "SERVING"
        assert seen.index("NOT_SERVING") < seen.index("SERVING")
    finally:
        core.terminate()
        assert core.wait(30) == 0


def test_edge_ready_follows_the_core(tmp_path: Path) -> None:
    config: dict[str, Any] = {"core": {"metrics_port": -1, "engines": {"default": FAST_ENGINE}}}
    with running_stack(config=config, data_dir=tmp_path / "data") as stack:
        assert status(stack.http_url + "/ready") == 200
        stack.core.stop()
        assert status(stack.http_url + "/ready") == 503
        assert status(stack.http_url + "/health") == 200


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
