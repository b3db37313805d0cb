# Everyday verbs. `make run` and `make test` each do all of their own set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
REPOSITORY ?= model_repository
MODEL      ?= mnist_cnn

.PHONY: run train serve test test-contended faults lint typecheck proto tools bench bench-table bench-path bench-int8 clean constraints

# --- set-up -----------------------------------------------------------------
# Every install takes its versions from constraints.txt, the versions the tests ran; the images
# install the same ones (scripts/install-deps.sh). --build-constraint pins setuptools for the build.
PIP_INSTALL := $(PY) -m pip install --quiet -c constraints.txt --build-constraint constraints.txt

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt pip setuptools

# One stamp per dependency set, remade when pyproject.toml or the pins change.
$(VENV)/.stamp-run: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP_INSTALL) -e '.[training,serving]'
	touch $@

$(VENV)/.stamp-dev: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP_INSTALL) -e '.[training,serving,dev]'
	touch $@ $(VENV)/.stamp-run

# Rewrites constraints.txt from .venv after a deliberate upgrade there (tested with `make test`);
# a test fails while the file and .venv disagree.
constraints:
	$(PY) scripts/freeze-constraints.py

# System tools the checks run for real: Prometheus (promtool), nginx, chromium, and Triton's
# perf_analyzer (unpacked into .tools/).
tools: $(VENV)/.stamp-dev
	@bash scripts/install-system-tools.sh
	@bash scripts/install-perf-analyzer.sh $(PY)

# --- the main job -------------------------------------------------------------
# Trains the default model on the embedded digits when the repository has none, then serves it.
run: $(VENV)/.stamp-run
	$(PY) -m training train --repository $(REPOSITORY) --model-name $(MODEL) --if-missing
	$(PY) -m service --model-repository $(REPOSITORY)

train: $(VENV)/.stamp-run
	$(PY) -m training train --repository $(REPOSITORY) --model-name $(MODEL)

serve: $(VENV)/.stamp-run
	$(PY) -m service --model-repository $(REPOSITORY)

# Batching on vs off at 64 concurrent single-image clients, on resnet18 (docs/benchmark.md).
BENCH_REPOSITORY ?= bench_repository
# The bench models: an untrained resnet18 for 3x32x32, and the default CNN (1x28x28, the preset
# `make train` uses) trained for one short epoch: weights do not change its speed.
BENCH_RESNET18 := test -d $(BENCH_REPOSITORY)/resnet18 || $(PY) -m training export-arch resnet18 \
	--num-classes 10 --input-size 32 --channels 3 --repository $(BENCH_REPOSITORY) \
	--model-name resnet18
BENCH_SMALL_CNN := test -d $(BENCH_REPOSITORY)/small_cnn || $(PY) -m training train --quiet \
	--epochs 1 --max-samples 1000 --device cpu --no-report --no-progress \
	--repository $(BENCH_REPOSITORY) --model-name small_cnn
bench: $(VENV)/.stamp-run
	$(BENCH_RESNET18)
	$(PY) -m service.tools.bench --model-repository $(BENCH_REPOSITORY) --model resnet18 --providers cpu \
		--server-max-batch-size 1 32 --concurrency 1 16 64 --duration 8 --warmup 2 \
		--in-process-batch-sizes 1 2 4 8 16 32 64

# Issue 11's table: the server against an inline reference server and ONNX Runtime alone, on
# resnet18 and the small CNN (docs/benchmark.md). BENCH_SECONDS and BENCH_WARMUP: each run's.
BENCH_SECONDS ?= 8
BENCH_WARMUP ?= 2
bench-table: $(VENV)/.stamp-run
	$(BENCH_RESNET18)
	$(BENCH_SMALL_CNN)
	$(PY) -m service.tools.bench --table --model-repository $(BENCH_REPOSITORY) --large-model resnet18 \
		--small-model small_cnn --providers cpu --duration $(BENCH_SECONDS) \
		--warmup $(BENCH_WARMUP) --in-process-batch-sizes 1 2 4 8 16 32 64

# What the path around ONNX Runtime costs a request (docs/benchmark.md): the server and the
# reference on the small CNN's null twin (same signature, a run that costs nothing), alternating.
bench-path: $(VENV)/.stamp-run
	$(BENCH_SMALL_CNN)
	$(PY) -m service.tools.path_cost --model-repository $(BENCH_REPOSITORY) --model small_cnn \
		--concurrency 1 4 64 --rounds 2

# INT8 against FP32 (issue 11, docs/benchmark.md): INT8 siblings of the two bench models, ONNX
# Runtime alone (interleaved rounds), then each served at 64 clients, FP32 and INT8 alternating.
# The 1-epoch small_cnn is a speed stand-in: its accuracy bound is proven on the default model
# (docs/quantization.md), so the bound is lifted here.
BENCH_INT8_SERVED := small_cnn small_cnn_int8 resnet18 resnet18_int8
bench-int8: $(VENV)/.stamp-run
	$(BENCH_RESNET18)
	$(BENCH_SMALL_CNN)
	test -d $(BENCH_REPOSITORY)/resnet18_int8 || $(PY) -m training quantize \
		--repository $(BENCH_REPOSITORY) --model resnet18 --calibration random
	test -d $(BENCH_REPOSITORY)/small_cnn_int8 || $(PY) -m training quantize \
		--repository $(BENCH_REPOSITORY) --model small_cnn --max-accuracy-drop 100
	$(PY) -m training.quantize_bench $(BENCH_REPOSITORY)/small_cnn_int8 \
		$(BENCH_REPOSITORY)/resnet18_int8 --batch-sizes 1 8 32 64 128
	for model in $(BENCH_INT8_SERVED); do \
		$(PY) -m service.tools.bench --model-repository $(BENCH_REPOSITORY) --model $$model \
			--providers cpu --server-max-batch-size 32 --concurrency 64 \
			--duration $(BENCH_SECONDS) --warmup $(BENCH_WARMUP) --in-process-batch-sizes \
			|| exit 1; \
	done

# --- checks -------------------------------------------------------------------
test: $(VENV)/.stamp-dev tools lint typecheck
	$(PY) -m pytest

# The service tests and the fault suite again, on one core shared with a CPU-bound process
# (a much slower machine): they order events explicitly, so they must pass here too.
test-contended: $(VENV)/.stamp-dev
	bash scripts/contended.sh $(PY) -m pytest -q -p no:cacheprovider tests/service tests/faults \
		--deselect tests/faults/test_overload.py::test_a_flood_of_expired_calls_is_dropped_before_any_work

# The fault suite alone, with its figures (docs/reliability.md).
faults: $(VENV)/.stamp-dev
	$(PY) -m pytest -q -s tests/faults

lint: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.stamp-dev
	$(VENV)/bin/mypy

# Regenerates service/_proto from protos/ (a test fails when they drift apart).
proto: $(VENV)/.stamp-dev
	$(PY) -m service.tools.protogen

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
