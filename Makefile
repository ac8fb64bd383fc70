# Two commands set everything up on a fresh machine: `make run` and `make test`.
# Each creates .venv and installs the pinned dependencies (requirements.lock) on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
CONFIG ?= corvex.yaml
PROTOS := $(wildcard proto/corvex/v1/*.proto)

.PHONY: run test lint fmt proto proto-check drift-gate bench bench-soak vllm-check lock clean \
	browser screenshots

$(INSTALLED): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev,bench]'
	touch $(INSTALLED)

## Start the whole stack (core on simulated engines + OpenAI edge) and print a dev key.
run: $(INSTALLED)
	$(BIN)/corvex serve --config $(CONFIG)

## Lint, check generated code, run the tests and the pricing drift gate.
test: $(INSTALLED) browser
	$(MAKE) --no-print-directory lint proto-check
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory drift-gate

## The browser the dashboard's tests drive: Debian's chromium (Playwright cannot download its
## own here). Installed with apt-get when missing; if that fails, the browser test fails and
## says why.
CHROMIUM := /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq chromium >/dev/null; } || echo "make browser: could not install chromium"

## Screenshots of every page of the web app into docs/screenshots (the browser journey).
screenshots: $(INSTALLED) browser
	CORVEX_SCREENSHOTS=docs/screenshots $(BIN)/python -m pytest -q tests/e2e/test_dashboard_browser.py

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

fmt: $(INSTALLED)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## Regenerate the gRPC stubs in corvex/v1 from proto/.
proto: $(INSTALLED)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -Iproto \
	  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. $(PROTOS)

## Fail if the committed stubs differ from what proto/ generates.
proto-check: $(INSTALLED)
	rm -rf .proto-check && mkdir .proto-check
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -Iproto \
	  --python_out=.proto-check --grpc_python_out=.proto-check \
	  --mypy_out=.proto-check --mypy_grpc_out=.proto-check $(PROTOS)
	diff -r -x __init__.py -x __pycache__ .proto-check/corvex/v1 corvex/v1 \
	  || { echo "corvex/v1 is stale: run 'make proto' and commit the result"; exit 1; }
	rm -rf .proto-check

## The tier-0 pricing drift gate: docs/pricing.md, the rate card and a live /v1/models agree.
drift-gate: $(INSTALLED)
	$(BIN)/corvex docs pricing --check
	$(BIN)/corvex drift-gate --start-stack

## Benchmarks (a few minutes): results in benchmarks/results and benchmarks/README.md.
bench: $(INSTALLED)
	$(BIN)/python -m benchmarks --out benchmarks/results

## Soak, not part of bench (~11 min): paced streams at 75% of the node capacity for 10 minutes,
## RSS of core and edge over time (benchmarks/results/soak.json, soak_rss.png).
bench-soak: $(INSTALLED)
	$(BIN)/python -m benchmarks soak --minutes 10 --fraction 0.75 --out benchmarks/results

## Check the vLLM adapter's calls against the real vllm classes (separate venv, several GB).
vllm-check:
	PYTHON=$(PYTHON) bash scripts/vllm-check.sh

lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --disable-pip-version-check '.[dev,bench]'
	.venv-lock/bin/python -m pip freeze --exclude corvex > requirements.lock
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
