# FaceMatch: `make demo` and `make test` are the two set-up commands.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export FACEMATCH_MODEL_ROOT ?= $(CURDIR)/.cache/models
export FACEMATCH_CACHE_DIR ?= $(CURDIR)/.cache

.PHONY: help install models photos lint test test-unit up down demo bench fuzz clean

help:
	@echo "make demo   - start the whole pipeline on an embedded broker, ingest real photos, match a selfie"
	@echo "make test   - lint + every test against the real broker, emulator and models"
	@echo "make up     - start broker + services in the background (bridge on :5000); make down stops them"
	@echo "              make up DURABLE_DIR=.state/broker keeps the embedded broker's data across restarts"
	@echo "make bench  - every benchmark, then BENCHMARKS.md (JSON in bench/results/, plots in docs/bench/)"
	@echo "make fuzz   - schemathesis against the bridge's OpenAPI, 200 cases per operation and mode (1,000+)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

models: $(STAMP)
	$(VENV)/bin/facematch models fetch --model-root $(FACEMATCH_MODEL_ROOT)

photos: $(STAMP)
	$(VENV)/bin/facematch photos fetch --dir $(FACEMATCH_CACHE_DIR)/photos

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline tests bench
	$(VENV)/bin/mypy pipeline

test: lint models
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

up: models
	$(VENV)/bin/facematch stack up $(if $(DURABLE_DIR),--durable-dir $(DURABLE_DIR))

down:
	@if [ -x $(VENV)/bin/facematch ]; then $(VENV)/bin/facematch stack down; fi

demo: models photos
	$(VENV)/bin/facematch demo

fuzz: models
	FACEMATCH_FUZZ_EXAMPLES=200 $(PY) -m pytest -q -p no:cacheprovider -s tests/fuzz

.PHONY: soak
soak: $(STAMP)
	FACEMATCH_FAULT_PHOTOS=$${FACEMATCH_FAULT_PHOTOS:-10000} $(PY) -m pytest -q -s -p no:cacheprovider tests/faults

# Benchmark sizes (documented in BENCHMARKS.md's header): make bench FACEMATCH_BENCH_ENGINE_FACES=20000 ...
export FACEMATCH_BENCH_MATCH_FACES ?= 10000
export FACEMATCH_BENCH_QUERIES ?= 500
export FACEMATCH_BENCH_EMBED_COPIES ?= 6
export FACEMATCH_BENCH_ENGINE_FACES ?= 100000
export FACEMATCH_BENCH_ENGINE_QUERIES ?= 300
export FACEMATCH_BENCH_TIMEOUT_S ?= 600

.PHONY: bench-deps
bench-deps: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'

# Every bench/*.py script in its own process (a failure or timeout is recorded, the rest still run),
# then BENCHMARKS.md and docs/bench/*.png from bench/results/*.json; fails at the end if a script did.
bench: bench-deps models
	$(PY) bench/run_all.py; rc=$$?; $(PY) bench/report.py && exit $$rc

clean: down
	rm -rf .run .state bench/results
