# Every target creates or refreshes .venv by itself, so a fresh clone needs only `make demo` / `make test`.
# Separate stamps: `make demo` installs the runtime package only (no test tools), `make test`
# adds [dev], `make notebooks` adds [notebooks]; each re-installs when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed-dev
NOTEBOOKS_STAMP := $(VENV)/.installed-notebooks

.PHONY: demo test bench lint venv notebooks clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# --no-compile: byte-compiling every file of the dependencies (openai alone has thousands)
# took most of the install on a loaded 2-core machine; Python compiles what it imports.
$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -e .
	touch $(RUNTIME_STAMP)

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(DEV_STAMP) $(RUNTIME_STAMP)

$(NOTEBOOKS_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[notebooks]'
	touch $(NOTEBOOKS_STAMP) $(RUNTIME_STAMP)

venv: $(DEV_STAMP)

DEMO_ARGS ?=

demo: $(RUNTIME_STAMP)
	$(BIN)/rlm demo $(DEMO_ARGS)

# Jupyter refuses to start as root without --allow-root (containers and CI often run as root).
NOTEBOOK_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

notebooks: $(NOTEBOOKS_STAMP)
	$(BIN)/jupyter lab $(NOTEBOOK_ARGS) notebooks/

test: $(DEV_STAMP)
	$(BIN)/ruff check rlm tests benchmarks test_true_async.py
	$(BIN)/python -m pytest -q

bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/fanout.py
	$(BIN)/python benchmarks/repl.py
	$(BIN)/python benchmarks/sandbox.py
	$(BIN)/python benchmarks/e2e.py
	$(BIN)/python benchmarks/vs_rlms.py
	$(BIN)/python benchmarks/structured.py
	$(BIN)/python benchmarks/many_tasks.py
	$(BIN)/python benchmarks/worker_pool.py

lint: $(DEV_STAMP)
	$(BIN)/ruff check rlm tests benchmarks test_true_async.py

clean:
	rm -rf $(VENV) build *.egg-info
