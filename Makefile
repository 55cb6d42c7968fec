PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup setup-cuda test test-slow lint clean

# CPU set-up: torch==2.13.0 is the CPU build; install it before anything that depends on torch
# so that pip never resolves a (multi-GB) CUDA build.
$(VENV)/.done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	touch $@

setup: $(VENV)/.done

# GPU set-up: PyPI's default Linux torch wheel is a CUDA build; install it first, then the project.
setup-cuda:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install 'torch>=2.4'
	$(PIP) install -e '.[dev]'
	touch $(VENV)/.done

test: setup
	$(PY) -m pytest -q -x --durations=10

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(PY) -m ruff check vdm tests train.py sample.py

clean:
	rm -rf $(VENV) outputs multirun
