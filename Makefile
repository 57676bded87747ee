# The two commands a new user runs: `make demo` and `make test` (as root, on Debian 12/Ubuntu).
VENV := .venv
PY := $(VENV)/bin/python
.PHONY: deps demo test unit chaos lint typecheck bench clean fuzz-deps dist

deps:
	@bash scripts/install-deps.sh

demo: deps
	$(VENV)/bin/loden demo

# Three workers on two cores: most tests wait on agents, etcd and pings rather than
# compute, and every test names its namespaces, devices and ports uniquely. One worker
# per file (loadfile) keeps a file's fixtures and ordering as written. Measured: the
# serial run was over 20 minutes here, 3 workers take 11-12.
PYTEST_WORKERS ?= 3
test: deps lint typecheck
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile tests

unit: deps
	$(PY) -m pytest -q tests/unit

chaos: deps
	$(PY) -m pytest -q -s tests/chaos | tee .venv/chaos.log
	$(PY) scripts/reliability_table.py .venv/chaos.log > docs/reliability.md

lint: deps
	$(VENV)/bin/ruff check src tests bench scripts fuzz
	$(VENV)/bin/ruff format --check src tests bench scripts fuzz

typecheck: deps
	$(VENV)/bin/mypy src tests bench scripts fuzz

bench: deps
	$(PY) bench/alloc.py
	$(PY) bench/scale.py
	$(PY) bench/dataplane.py

# A wheel and an sdist in dist/. The udp C loops are built when a compiler and Python's
# headers are there (setup.py: optional=True); without them the wheel is pure Python.
dist: deps
	rm -rf dist
	$(PY) -m build --outdir dist .

# atheris is not a project dependency (fuzz/README.md): a venv of its own, inside .venv.
fuzz-deps: deps
	test -x $(VENV)/fuzz/bin/python || python3 -m venv $(VENV)/fuzz
	$(VENV)/fuzz/bin/pip install atheris==3.1.0

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info src/loden/udp/_fastpath*.so
