# Two entry points for a fresh machine with Python 3.11+: `make demo` and `make test`.
# Each creates .venv by itself and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench lint typecheck node-deps clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "sage-zmq needs Python 3.11+: set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,metrics,ray,plot]"
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/sage-zmq demo

# Node.js peer dependencies for the interop tests (skipped by the tests when node is absent).
node-deps:
	@if command -v npm >/dev/null 2>&1 && [ -f transports/node/package.json ]; then \
		cd transports/node && (npm ci --no-audit --no-fund --loglevel=error || npm install --no-audit --no-fund --loglevel=error); \
	else echo "node/npm not found: the Node.js interop tests will be skipped"; fi

test: install node-deps
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/sage-zmq bench

lint: install
	$(BIN)/ruff check sage_zmq tests examples
	$(BIN)/mypy sage_zmq

clean:
	rm -rf $(VENV) transports/node/node_modules .pytest_cache .mypy_cache .ruff_cache
