# The two commands of the README's Quick start. Both create .venv and install dtfx
# into it (editable, with the development tools) the first time, and again only
# when pyproject.toml changes.
#
#   make demo   run the bundled hello-cities example on the embedded SQLite task hub
#   make test   the quality gate: ruff (lint + format), mypy --strict, pytest
#   make bench  the benchmarks against DBOS Transact (writes BENCHMARKS.md; not part of the tests)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test bench install

demo: $(INSTALLED)
	$(BIN)/python -m dtfx.examples.hello_cities

test: $(INSTALLED)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest

bench: $(INSTALLED)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	$(BIN)/python -m benchmarks

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	@echo "Installing dtfx and its development tools into $(VENV)..."
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@
