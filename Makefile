# Everyday verbs. `make run` and `make test` each do all of their own set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
REPOSITORY ?= model_repository
MODEL      ?= mnist_cnn

.PHONY: run train serve test lint typecheck proto tools bench clean

# --- set-up -----------------------------------------------------------------
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One stamp per dependency set, remade when pyproject.toml changes.
$(VENV)/.stamp-run: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[training,serving]'
	touch $@

$(VENV)/.stamp-dev: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[training,serving,dev]'
	touch $@ $(VENV)/.stamp-run

# System tools the deployment checks run for real: Prometheus (promtool) and nginx.
tools:
	@bash scripts/install-system-tools.sh

# --- the main job -------------------------------------------------------------
# Trains the default model on the embedded digits when the repository has none, then serves it.
run: $(VENV)/.stamp-run
	$(PY) -m training train --repository $(REPOSITORY) --model-name $(MODEL) --if-missing
	$(PY) -m service --model-repository $(REPOSITORY)

train: $(VENV)/.stamp-run
	$(PY) -m training train --repository $(REPOSITORY) --model-name $(MODEL)

serve: $(VENV)/.stamp-run
	$(PY) -m service --model-repository $(REPOSITORY)

bench: $(VENV)/.stamp-dev
	$(PY) -m service.bench --help

# --- checks -------------------------------------------------------------------
test: $(VENV)/.stamp-dev tools lint typecheck
	$(PY) -m pytest

lint: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.stamp-dev
	$(VENV)/bin/mypy

# Regenerates service/_proto from protos/ (a test fails when they drift apart).
proto: $(VENV)/.stamp-dev
	$(PY) -m service.protogen

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
