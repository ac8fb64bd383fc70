"""`corvex serve --cores 2`: a local PostgreSQL, two cores and an edge, the same banner as one
core, the README tour's calls, and nothing left running after Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgspec
import openai
import psutil
import pytest

from tests.conftest import FAST_ENGINE, MODEL
from tests.e2e.reserved import FLASH

pytestmark = pytest.mark.e2e


def admin(core: str, token: str, *args: str) -> object:
    done = subprocess.run(
        [sys.executable, "-m", "corvex_cli", "admin", "--core", core, "--admin-token", token,
         *args],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return json.loads(done.stdout)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory PostgreSQL's own user may pass through (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="corvex-serve-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_serve_with_two_cores_runs_the_tour_and_stops_everything(scratch: Path) -> None:
    config = scratch / "corvex.yaml"
    config.write_bytes(
        msgspec.yaml.encode(
            {
                "core": {
                    "metrics_port": -1,
                    "engines": {"default": FAST_ENGINE},
                    "reserved": {"pools": {FLASH: {"replicas": 1}}},
                },
                "edge": {"metrics_port": -1},
            }
        )
    )
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "corvex_cli",
            "serve",
            "--cores",
            "2",
            "--config",
            str(config),
            "--port",
            "0",
            "--core-port",
            "0",
            "--data-dir",
            str(scratch / "data"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert serve.stdout is not None
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = serve.stdout.readline()
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        banner = "".join(lines)
        assert (
            "Corvex is running (simulated engines, 2 cores sharing a PostgreSQL ledger)" in banner
        )
        url = re.search(r"OpenAI API   (\S+)", banner)
        key = re.search(r"API key      (\S+)", banner)
        cores = re.search(r"gRPC core    (\S+), (\S+)", banner)
        workspace = re.search(r"workspace    dev \((ws_\w+)\), balance \$5\.00", banner)
        assert url and key and cores and workspace, banner
        assert "ledger       PostgreSQL 127.0.0.1:" in banner
        # The web app too: its sign-up page is served (the journey: test_dashboard_browser.py).
        dashboard = re.search(r"dashboard    (\S+)", banner)
        assert dashboard, banner
        with urllib.request.urlopen(dashboard[1] + "signup", timeout=30) as page:
            assert page.status == 200 and b'name="email"' in page.read()
        with openai.OpenAI(base_url=url[1], api_key=key[1], max_retries=0) as client:
            reply = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=12
            )
        assert reply.usage is not None and (reply.usage.model_extra or {})["cost"]
        token = (scratch / "data" / "admin_token").read_text().strip()
        shown = admin(cores[2], token, "workspace", "show", workspace[1])
        assert isinstance(shown, dict)
        balance = shown["balance_usd"]
        assert balance == f"{5 - float((reply.usage.model_extra or {})['cost']):.8f}".rstrip("0")
        # The tour's reserved endpoint: rented on the first core, called through the edge,
        # listed and deleted on the second.
        rented = admin(cores[1], token, "endpoint", "create", workspace[1], "--offering", FLASH,
                       "--name", "prod")  # fmt: skip
        assert isinstance(rented, dict) and rented["status"] == "running", rented
        with openai.OpenAI(base_url=url[1], api_key=key[1], max_retries=0) as client:
            for _ in range(3):
                answer = client.chat.completions.create(
                    model=rented["model"], messages=[{"role": "user", "content": "Hi"}],
                    max_tokens=4,
                )  # fmt: skip
                assert answer.usage is not None
                assert (answer.usage.model_extra or {})["cost_nano_usd"] == 0
        listed = admin(cores[2], token, "endpoint", "list", workspace[1])
        assert isinstance(listed, list) and [e["id"] for e in listed] == [rented["id"]]
        deleted = admin(cores[2], token, "endpoint", "delete", rented["id"])
        assert isinstance(deleted, dict) and deleted["status"] == "deleted"
        children = psutil.Process(serve.pid).children(recursive=True)
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        assert serve.wait(60) == 0
        if serve.stdout is not None:
            serve.stdout.close()
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
