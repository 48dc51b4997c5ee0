# Every target bootstraps its own virtualenv, so a fresh clone needs only python3 >= 3.11.
# Installs come from the committed, hash-pinned lock files in requirements/ (see
# docs/development.md): the same versions on every machine until a deliberate `make upgrade` commit.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# `comfygate init` writes comfygate/comfygate.toml: `make run` uses it once it exists.
CONFIG ?= $(firstword $(wildcard comfygate/comfygate.toml) config/comfygate.example.toml)
STAMP  := $(VENV)/.installed
LOCK   := requirements/dev.txt
# One resolution for every lock file: all platforms, the oldest supported Python.
UV_COMPILE = $(BIN)/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes

.PHONY: install run test test-unit docs lint typecheck check bench bench-sched browser-deps clean lock upgrade test-oldest

# Re-runs only when the lock or pyproject.toml changed: an up-to-date venv needs no network.
# pip checks every hash (--require-hashes is implied by the hashes in the file) and refuses a
# package the lock does not pin; comfygate itself is installed editable with the locked
# setuptools (--no-build-isolation), so no build step fetches anything unpinned.
$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

## lock: re-resolve requirements/*.txt within pyproject.toml's ranges (keeps current pins
## where they still fit); commit the result
lock: $(STAMP)
	$(UV_COMPILE) pyproject.toml requirements/tools.in --extra dev -o requirements/dev.txt
	$(UV_COMPILE) pyproject.toml -c requirements/dev.txt -o requirements/runtime.txt
	$(UV_COMPILE) requirements/build.in -c requirements/dev.txt -o requirements/build.txt
	$(UV_COMPILE) pyproject.toml --resolution lowest-direct -o requirements/oldest.txt

## upgrade: the newest versions within the ranges, then lint, typecheck and the suite on them
upgrade: $(STAMP)
	$(UV_COMPILE) pyproject.toml requirements/tools.in --extra dev --upgrade -o requirements/dev.txt
	$(MAKE) lock
	$(MAKE) install lint typecheck test

## test-oldest: the suite with comfygate's runtime dependencies at the lowest versions
## pyproject.toml admits (requirements/oldest.txt), the test tools as locked
test-oldest:
	test -x .venv-oldest/bin/python || $(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes -r $(LOCK)
	.venv-oldest/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements/oldest.txt
	.venv-oldest/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	COMFYGATE_TEST_LOCK=oldest.txt .venv-oldest/bin/python -m pytest $(PYTEST_ARGS)

## run: serve the proxy (ComfyUI on 127.0.0.1:8188, no Redis) with comfygate/comfygate.toml
## from `comfygate init`, else the example configuration (a one-time admin token is printed)
run: $(STAMP)
	$(BIN)/comfygate serve --config $(CONFIG)

## test: the whole suite (starts its own redis-server, fake ComfyUI and, when installed, Chromium),
## in TEST_WORKERS processes (pytest-xdist; each worker has its own Redis, ports and tmp dirs;
## a module's tests stay in one worker); TEST_WORKERS=0 runs it in this process
TEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

## test-unit: the unit tests alone (tests/unit: no server, no Redis, no browser), in seconds
test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

## docs: regenerate docs/configuration.md from the settings model (a test fails when it is stale)
docs: $(STAMP)
	$(BIN)/python -m proxy.config_reference

## lint: ruff, and the import contract (pyproject.toml [tool.importlinter]: imports only go down
## the layers)
lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

## bench: fake upstream vs comfygate vs nginx (when installed), side by side, ratios printed,
## the issue-17 table at the end (docs/performance-profile.md); bench-deps installs wrk + nginx
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

## bench-sched: the gateway queue's fairness, gaps and cost against a fake ComfyUI (docs/scheduler.md)
bench-sched: $(STAMP)
	$(BIN)/python -m bench.sched

## soak: two replicas, two fake ComfyUIs and Redis under mixed load with injected faults
## (3 minutes by default; SOAK_ARGS="--duration 600 --users 8"); exit 1 when a promise fails
.PHONY: soak
soak: $(STAMP)
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

## dashboard: regenerate deploy/grafana/dashboards/comfygate.json from deploy/grafana/dashboard.py
.PHONY: dashboard dashboard-preview
dashboard: $(STAMP)
	$(BIN)/python deploy/grafana/dashboard.py > deploy/grafana/dashboards/comfygate.json.tmp
	mv deploy/grafana/dashboards/comfygate.json.tmp deploy/grafana/dashboards/comfygate.json

## dashboard-preview: re-draw deploy/grafana/preview.png from a real Prometheus (a few minutes)
dashboard-preview: $(STAMP)
	$(BIN)/python -m tests.deploy.preview $(PREVIEW_ARGS)

.PHONY: bench-deps
bench-deps:
	command -v wrk >/dev/null && command -v nginx >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk nginx)

## browser-deps: Debian's Chromium for the browser tests (CI runs this; needs root)
browser-deps:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

clean:
	rm -rf $(VENV) .venv-oldest .mypy_cache .ruff_cache .pytest_cache
