# Two commands on a fresh machine: `make demo` and `make test` (each creates .venv and installs what it needs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints-dev.txt
	$(BIN)/python -m pip install -q -c constraints-dev.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q -c constraints-dev.txt -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/graft demo

test: $(VENV)/.installed-dev
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q --durations=10

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
