# Two commands on a fresh machine: `make demo` and `make test` (each creates .venv and installs what it needs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test chromium clean

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

# The browser tests (tests/test_browser.py) need a Chromium: as root (CI) Debian's package is installed when none is
# found; otherwise they skip, and -rs prints why. GRAFT_CHROMIUM names a binary explicitly.
chromium:
	@if [ -n "$$GRAFT_CHROMIUM" ] || command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
	    || command -v google-chrome >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && apt-get install -y -q --no-install-recommends chromium \
	    || echo "make: installing chromium failed; the browser tests will skip"; \
	else echo "make: no Chromium and not root: the browser tests will skip (apt-get install chromium)"; fi

test: $(VENV)/.installed-dev chromium
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -rs --durations=10

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
