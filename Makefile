# The README's two commands. Each makes .venv if missing and installs only what changed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint

demo: $(VENV)/.installed-main
	$(PY) -m phased_jax.demo

# Two workers (pytest-xdist) for the machine's two cores; a test file runs whole on one worker,
# so its module fixtures are built once. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed-test
	$(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check phased_jax tools tests benchmarks configs launch

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-main: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed-main
