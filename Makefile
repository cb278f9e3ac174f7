# Two commands on a fresh machine: `make dev` runs the whole stack, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: dev test lint bench bench-quick clean package lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-local: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[local]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed-local

dev: $(VENV)/.installed-local
	$(BIN)/python -m infra.dev

test: $(VENV)/.installed-dev
	sh scripts/ensure-chromium
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/mypy

$(VENV)/.installed-bench: pyproject.toml $(VENV)/.installed-dev
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

# The whole suite beside PgQueuer, Procrastinate and pgbench on one embedded Postgres (~7 min).
bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench

bench-quick: $(VENV)/.installed-dev
	$(BIN)/python -m bench --quick

# The Lambda zip for python3.13 on arm64 (ARCH=x86_64 for this machine), from the hashed lock;
# a Python 3.13 compiles its modules (TICKWEAVE_PACKAGE_PYTHON, or python3.13 on the PATH).
ARCH ?= arm64
package: $(BIN)/python
	$(BIN)/python -m infra.package --arch $(ARCH)

# Re-resolve infra/package-requirements.txt from pyproject.toml's dependencies (network: PyPI).
lock: $(BIN)/python
	$(BIN)/python -m infra.lock

clean:
	rm -rf $(VENV) .tickweave .pytest_cache .mypy_cache .ruff_cache
