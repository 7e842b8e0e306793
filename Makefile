# Every target creates or refreshes .venv by itself, so a fresh clone needs only `make demo` / `make test`.
# Separate stamps: `make demo` installs the runtime package only (no test tools), `make test`
# adds [dev], `make notebooks` adds [notebooks]; each re-installs when pyproject.toml changes.
# PYTHON picks the interpreter: `make test PYTHON=python3.13` takes a command on PATH or,
# when that does not run (a pyenv shim of a version not selected), the newest
# ~/.pyenv/versions/3.13*. Given on the command line for another version than python3's,
# it gets its own venv (.venv-3.13 ...), so several coexist beside .venv; PYTHON from the
# environment keeps .venv (what `make demo` prints and scripts expect).
PYTHON ?= python3
PY := $(shell $(PYTHON) -c 'import sys' >/dev/null 2>&1 && command -v $(PYTHON) || \
	ls -d $(HOME)/.pyenv/versions/$(patsubst python%,%,$(notdir $(PYTHON)))*/bin/python 2>/dev/null | sort -V | tail -1)
version = $(shell $(1) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
PYVER := $(call version,$(PY))
OWN_VENV := $(and $(filter command line,$(origin PYTHON)),$(filter-out $(call version,python3),$(PYVER)))
VENV ?= $(if $(OWN_VENV),.venv-$(PYVER),.venv)
BIN := $(VENV)/bin
# Extra pytest arguments, e.g. PYTEST_ARGS="-n 2" (pytest-xdist, in [dev]) or a test path.
PYTEST_ARGS ?=
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed-dev
NOTEBOOKS_STAMP := $(VENV)/.installed-notebooks
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: demo test bench lint venv notebooks docs docs-build clean

$(BIN)/python:
	@test -n "$(PY)" || { echo "no Python found for PYTHON=$(PYTHON)" >&2; exit 1; }
	$(PY) -m venv $(VENV)

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

$(DOCS_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[docs]'
	touch $(DOCS_STAMP) $(RUNTIME_STAMP)

venv: $(DEV_STAMP)

DEMO_ARGS ?=

demo: $(RUNTIME_STAMP)
	$(BIN)/rlm demo $(DEMO_ARGS)

# Jupyter refuses to start as root without --allow-root (containers and CI often run as root).
NOTEBOOK_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

notebooks: $(NOTEBOOKS_STAMP)
	$(BIN)/jupyter lab $(NOTEBOOK_ARGS) notebooks/

# The documentation site: `make docs` serves it with live reload, `make docs-build` builds
# it strictly into build/site/ (a broken link, reference or docstring fails the build).
docs: $(DOCS_STAMP)
	$(BIN)/mkdocs serve

docs-build: $(DOCS_STAMP)
	$(BIN)/mkdocs build --strict

test: $(DEV_STAMP)
	$(BIN)/ruff check rlm tests benchmarks test_true_async.py
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The benchmarks with their tables; the long ones at a smaller size (each file's docstring
# gives its full run). Run by hand: flood.py, job_caps.py, job_memory.py, policy.py and
# batch_api.py at its default 2,000 tasks.
bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/fanout.py
	$(BIN)/python benchmarks/repl.py
	$(BIN)/python benchmarks/sandbox.py
	$(BIN)/python benchmarks/e2e.py
	$(BIN)/python benchmarks/vs_rlms.py
	$(BIN)/python benchmarks/structured.py
	$(BIN)/python benchmarks/many_tasks.py
	$(BIN)/python benchmarks/worker_pool.py
	$(BIN)/python benchmarks/cache.py --quick
	$(BIN)/python benchmarks/limits.py --repeat 1
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/tracing.py --quick
	$(BIN)/python benchmarks/bench_quality.py --runs 1
	$(BIN)/python benchmarks/batch_api.py --tasks 300
	$(BIN)/python benchmarks/providers.py
	$(BIN)/python benchmarks/prompt_cache.py

lint: $(DEV_STAMP)
	$(BIN)/ruff check rlm tests benchmarks test_true_async.py

clean:
	rm -rf $(VENV) build *.egg-info
