"""The peer: LiteLLM's proxy (`litellm[proxy]`) in front of the canned aiohttp backend, run
offline on 127.0.0.1 (local model cost map, a random master key, no database), so the same
load can be sent to it as to Corvex. LiteLLM lives in its own virtualenv,
`.venv-bench-litellm`, created on first use; it is never installed into the project's."""

from __future__ import annotations

import contextlib
import secrets
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from benchmarks import venvs
from benchmarks.processes import launch_command
from benchmarks.systems import System
from benchmarks.workload import DEFAULT_MODEL

VENV = venvs.ROOT / ".venv-bench-litellm"
REQUIREMENT = "litellm[proxy]"
INSTALL_TIMEOUT_S = venvs.INSTALL_TIMEOUT_S
START_TIMEOUT_S = 180.0


class PeerUnavailable(Exception):
    """LiteLLM could not be installed or started; the message says why (the scenario is
    skipped with this note)."""


def _litellm_bin() -> Path:
    return VENV / "bin" / "litellm"


def ensure_installed(*, timeout_s: float = INSTALL_TIMEOUT_S) -> str:
    """Creates the LiteLLM virtualenv if needed; returns the installed LiteLLM version."""
    try:
        return venvs.ensure(VENV, REQUIREMENT, "litellm", timeout_s=timeout_s)
    except venvs.VenvError as exc:
        raise PeerUnavailable(str(exc)) from None


def _free_port() -> int:
    """A port that was free a moment ago (LiteLLM cannot report a port-0 binding)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def proxy_config(backend_url: str, master_key: str) -> dict[str, Any]:
    """One model, named like Corvex's, routed to the canned OpenAI-compatible backend."""
    return {
        "model_list": [
            {
                "model_name": DEFAULT_MODEL,
                "litellm_params": {
                    "model": "openai/canned",
                    "api_base": backend_url + "/v1",
                    "api_key": "canned",
                },
            }
        ],
        "litellm_settings": {"drop_params": True, "telemetry": False},
        "general_settings": {"master_key": master_key},
    }


def _health_probe(url: str) -> Any:
    def probe() -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(url + "/health/liveliness", timeout=2) as reply:
                return {"status": reply.status} if reply.status == 200 else None
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    return probe


@contextlib.contextmanager
def litellm(backend_url: str, workers: int, workdir: Path) -> Iterator[System]:
    """The LiteLLM proxy with `workers` uvicorn workers in front of `backend_url`."""
    master_key = "sk-bench-" + secrets.token_hex(16)
    config_path = workdir / f"litellm-{workers}w.yaml"
    config_path.write_bytes(msgspec.yaml.encode(proxy_config(backend_url, master_key)))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(_litellm_bin()), "--config", str(config_path), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--num_workers", str(workers)]
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    try:
        server = launch_command(
            f"litellm-{workers}w",
            argv,
            _health_probe(url),
            workdir=workdir,
            env=env,
            timeout_s=START_TIMEOUT_S,
        )
    except Exception as exc:
        raise PeerUnavailable(f"LiteLLM did not start: {exc}") from exc
    try:
        yield System(
            f"litellm-{workers}w",
            {"proxy": server.pid},
            http_url=url,
            api_keys=(master_key,),
            logs={"proxy": server.log_path},
        )
    finally:
        server.stop()
