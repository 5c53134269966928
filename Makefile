# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv (Python 3.12) when missing and reinstall only when the dependency pins change.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Test processes: most tests wait on subprocess start-up, file I/O or gloo, so two share 2 cores well. A file's
# tests stay in one process (--dist loadfile), so its module fixtures are built once; files are handed out in
# collection order (--no-loadscope-reorder), which tests/conftest.py makes longest first.
PYTEST_WORKERS ?= 2

.PHONY: venv vllm-env demo test lint ablate clean

venv:
	@bash scripts/ensure_venv.sh

# The separate vLLM environment (.vllm-venv, Python 3.11) that `bench-inference --engine vllm` runs its worker in.
vllm-env:
	@bash scripts/vllm_env.sh

demo: venv
	$(PY) -m megatron_slim.cli demo

ablate: venv
	$(PY) -m megatron_slim.cli ablate --suite paper

# Lint first (seconds): a style or pyflakes finding fails before the tests start.
test: lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 tests $(PYTEST_ARGS)

# ruff's rules: pyproject.toml [tool.ruff] (pyflakes, pycodestyle, import order, 120 columns).
lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf "$(VENV)" build *.egg-info .pytest_cache
