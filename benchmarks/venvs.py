"""Virtualenvs of their own for the tools the benchmarks drive but never import (the LiteLLM
peer, guidellm, aiperf): created beside the project's `.venv` on first use, one pinned
requirement each, so their dependency trees never meet the project's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT_S = 900.0


class VenvError(Exception):
    """A tool could not be installed or asked; the message says why."""


def run(argv: list[str], *, timeout_s: float, env: dict[str, str] | None = None) -> str:
    """Runs a command to completion; its stdout, or VenvError with the end of its stderr."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise VenvError(f"`{' '.join(argv[:4])} ...` took over {timeout_s:.0f}s") from None
    except OSError as exc:
        raise VenvError(f"`{' '.join(argv[:4])} ...` could not start: {exc}") from None
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "WARNING" not in line]
        tail = "\n".join(errors[-10:])
        raise VenvError(f"`{' '.join(argv[:4])} ...` failed:\n{tail}")
    return done.stdout


def installed_version(venv: Path, distribution: str) -> str | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    try:
        out = run([str(python), "-m", "pip", "show", distribution], timeout_s=60)
    except VenvError:
        return None
    for line in out.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return None


def ensure(
    venv: Path, requirement: str, distribution: str, *, timeout_s: float = INSTALL_TIMEOUT_S
) -> str:
    """`requirement` installed in `venv` (created if needed); returns the installed version
    of `distribution`. A pinned requirement (`name==1.2.3`) is reinstalled when another
    version is there."""
    pinned = requirement.partition("==")[2]
    version = installed_version(venv, distribution)
    if version is not None and (not pinned or version == pinned):
        return version
    if not (venv / "bin" / "python").exists():
        run([sys.executable, "-m", "venv", "--clear", str(venv)], timeout_s=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    run([*pip, "--disable-pip-version-check", requirement], timeout_s=timeout_s)
    version = installed_version(venv, distribution)
    if version is None:
        raise VenvError(f"{distribution} is not installed in {venv}")
    return version
