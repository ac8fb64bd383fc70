#!/usr/bin/env bash
# `make vllm-check`: the vLLM adapter's calls checked against a real vLLM.
#
# Builds .venv-vllm, apart from .venv (which never holds vLLM), installs there the vLLM release
# that the adapter was written against (VLLM_VERSION_READ in corvex_core/engines/vllm_contract.py)
# and this project with its test tools, then runs the contract check (the same module the tests
# use: every vLLM name, parameter, field and parser name the adapter uses) and
# tests/core/engines/test_vllm_signatures.py. No GPU is needed: the check imports vLLM and
# inspects it, it starts no engine.
#
# About torch: vLLM pins one exact torch release (vLLM 0.33.0: torch==2.14.0, plus
# torchvision==0.29.0 and torchaudio==2.11.0). pip refuses any other torch next to it, so the CPU
# build of torch 2.13.0 that this workplace keeps on disk cannot be used; pip takes the CUDA build
# of 2.14.0 from PyPI with its nvidia-* wheels (several GB in the venv). A CUDA build of torch
# imports fine on a machine without a GPU, which is all this check needs.
#
# Environment: PYTHON (default python3), VLLM_VENV (default .venv-vllm), VLLM_VERSION (default:
# the contract's VLLM_VERSION_READ). Extra arguments go to pytest.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VLLM_VENV:-.venv-vllm}"
CONTRACT=corvex_core/engines/vllm_contract.py
VLLM_VERSION="${VLLM_VERSION:-$(sed -n 's/^VLLM_VERSION_READ: Final = "\(.*\)"$/\1/p' "$CONTRACT")}"
if [ -z "$VLLM_VERSION" ]; then
  echo "vllm-check: no VLLM_VERSION_READ in $CONTRACT" >&2
  exit 2
fi

PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
VLLM_MARKER="$VENV/.installed-vllm-$VLLM_VERSION"
PROJECT_MARKER="$VENV/.installed-project"
if [ ! -f "$VLLM_MARKER" ]; then
  echo "vllm-check: installing vllm==$VLLM_VERSION in $VENV (several GB on the first run)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "${PIP[@]}" --upgrade pip
  # vLLM first and alone, so that its exact pins (torch, transformers, ...) decide.
  "${PIP[@]}" "vllm==$VLLM_VERSION"
  touch "$VLLM_MARKER"
fi
if [ ! -f "$PROJECT_MARKER" ] || [ pyproject.toml -nt "$PROJECT_MARKER" ]; then
  # This project with its dev tools (pytest, pytest-asyncio, ...), resolved around vLLM.
  "${PIP[@]}" -e '.[dev]'
  touch "$PROJECT_MARKER"
fi

"$VENV/bin/python" -m corvex_core.engines.vllm_contract
exec "$VENV/bin/python" -m pytest -p no:cacheprovider -rs \
  tests/core/engines/test_vllm_signatures.py "$@"
