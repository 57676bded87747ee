# The two commands a new user runs: `make demo` and `make test` (as root, on Debian 12/Ubuntu).
VENV := .venv
PY := $(VENV)/bin/python
.PHONY: deps demo test unit lint typecheck bench clean

deps:
	@bash scripts/install-deps.sh

demo: deps
	$(VENV)/bin/loden demo

test: deps lint typecheck
	$(PY) -m pytest -q tests

unit: deps
	$(PY) -m pytest -q tests/unit

lint: deps
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: deps
	$(VENV)/bin/mypy

bench: deps
	$(PY) bench/alloc.py

clean:
	rm -rf $(VENV) build *.egg-info
