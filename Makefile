# The few commands people run. Everything installs into .venv (override with VENV=...).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup setup-test demo test lint bench clean
# a failed step leaves no target behind: `python3 -m venv` without ensurepip (Debian without
# python3-venv) fails after writing .venv/bin/python, and the next make would skip it
.DELETE_ON_ERROR:

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(VENV)/.setup: $(VENV)/bin/python pyproject.toml scripts/install-torch.sh
	scripts/install-torch.sh $(VENV)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.setup-test: $(VENV)/.setup
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.setup

setup-test: $(VENV)/.setup-test

## the service on embedded defaults (merge-service up), a real TSV merge of MiniLM task models
## submitted through its REST API; examples/demo.py does the same merge through the CLI
demo: setup-test
	HF_HUB_OFFLINE=1 $(PY) examples/demo_service.py

test: setup-test
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: setup-test
	$(PY) bench/run_merge_bench.py

clean:
	rm -rf .demo .pytest_cache .ruff_cache .mypy_cache
