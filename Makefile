# Every target bootstraps its own virtualenv, so a fresh clone needs only python3 >= 3.11.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config/comfygate.example.toml
STAMP  := $(VENV)/.installed

.PHONY: install run test lint typecheck check bench browser-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## run: serve the proxy on the embedded defaults (ComfyUI on 127.0.0.1:8188, no Redis)
run: $(STAMP)
	$(BIN)/comfygate serve --config $(CONFIG)

## test: the whole suite (starts its own redis-server, fake ComfyUI and, when installed, Chromium)
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

## bench: fake upstream vs comfygate vs nginx (when installed), side by side, ratios printed
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

## dashboard: regenerate deploy/grafana/dashboards/comfygate.json from deploy/grafana/dashboard.py
.PHONY: dashboard dashboard-preview
dashboard: $(STAMP)
	$(BIN)/python deploy/grafana/dashboard.py > deploy/grafana/dashboards/comfygate.json.tmp
	mv deploy/grafana/dashboards/comfygate.json.tmp deploy/grafana/dashboards/comfygate.json

## dashboard-preview: re-draw deploy/grafana/preview.png from a real Prometheus (a few minutes)
dashboard-preview: $(STAMP)
	$(BIN)/python -m tests.deploy.preview $(PREVIEW_ARGS)

## browser-deps: Debian's Chromium for the browser tests (CI runs this; needs root)
browser-deps:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
