# Kairos developer commands. `make demo` runs the main job, `make test` runs the tests;
# CI (.ci/run) calls `make check`, which is lint + types + test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STACK := $(PY) deploy/stack.py

.PHONY: help venv lock up down status logs demo test lint format typecheck check clean \
	bench-ingest bench-memory bench-decisions bench-catchup bench-drain bench-cost bench-stalls \
	loadtest

help:
	@echo "make demo       start Kafka, Redis, worker and API locally and print the URLs"
	@echo "make test       run the whole test suite against the real Kafka and Redis"
	@echo "make check      lint + typecheck + test (what CI runs)"
	@echo "make up|down|status|logs   the local stack (deploy/stack.py)"
	@echo "make lock       re-pin constraints.txt from a fresh resolve"
	@echo "make bench-ingest / bench-memory / bench-decisions / bench-catchup / bench-drain   benchmarks (loadtest/README.md)"
	@echo "make bench-cost / bench-stalls   a decision's CPU in process; the API loop's stalls by catalog size"
	@echo "make loadtest [SCENARIO=peak]   the peak-traffic suite: SLO verdict, JSON and HTML report"

# api/_kernels.pyx (the compiled decision loops) and stream_engine/_resp.pyx (the Redis
# command packer) are built by the editable install.
$(VENV)/.installed: pyproject.toml constraints.txt api/_kernels.pyx stream_engine/_resp.pyx
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Re-resolve the newest versions allowed by pyproject.toml and pin them for CI.
lock:
	rm -rf .lockvenv && $(PYTHON) -m venv .lockvenv
	.lockvenv/bin/pip install -q --upgrade pip && .lockvenv/bin/pip install -q -e '.[dev]'
	{ echo "# Pinned by 'make lock'; CI installs exactly these."; \
	  .lockvenv/bin/pip freeze --exclude-editable | grep -v '^-e'; } > constraints.txt
	rm -rf .lockvenv

up: venv
	$(STACK) up

down:
	@if [ -x $(PY) ]; then $(STACK) down; else $(PYTHON) deploy/stack.py down; fi

status: venv
	$(STACK) status

logs: venv
	$(STACK) logs

demo: venv
	$(STACK) demo $(DEMO_ARGS)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: venv
	$(VENV)/bin/mypy

check: lint typecheck test

# Benchmarks print figures beside a same-run baseline; they are not tests.
bench-ingest: up
	source .stack/stack.env && $(PY) -m loadtest ingest $(BENCH_ARGS)

bench-memory: up
	source .stack/stack.env && $(PY) -m loadtest memory $(BENCH_ARGS)

bench-decisions: up
	source .stack/stack.env && $(PY) -m loadtest decisions $(BENCH_ARGS)

bench-catchup: up
	source .stack/stack.env && $(PY) -m loadtest catchup $(BENCH_ARGS)

bench-drain: up
	source .stack/stack.env && $(PY) -m loadtest drain $(BENCH_ARGS)

bench-cost: up
	source .stack/stack.env && $(PY) -m loadtest cost $(BENCH_ARGS)

bench-stalls: up
	source .stack/stack.env && $(PY) -m loadtest stalls $(BENCH_ARGS)

# The peak-traffic suite on the local stack (started if needed): SCENARIO=smoke|peak|spike|
# soak|overload or a .toml file; LOADTEST_ARGS="--api URL --bootstrap HOST:PORT --slo ..."
SCENARIO ?= peak
loadtest: venv
	$(STACK) up redis kafka worker api
	source .stack/stack.env && $(PY) -m loadtest run $(SCENARIO) $(LOADTEST_ARGS)

clean: down
	rm -rf $(VENV) .stack .mypy_cache .ruff_cache .pytest_cache api/_kernels.c api/_kernels.*.so \
		stream_engine/_resp.c stream_engine/_resp.*.so
