# Every target creates or refreshes .venv by itself, so a fresh clone needs only `make demo` / `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/rlm demo

test: $(STAMP)
	$(BIN)/ruff check rlm tests benchmarks test_true_async.py
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/fanout.py
	$(BIN)/python benchmarks/repl.py
	$(BIN)/python benchmarks/sandbox.py
	$(BIN)/python benchmarks/e2e.py
	$(BIN)/python benchmarks/vs_rlms.py

lint: $(STAMP)
	$(BIN)/ruff check rlm tests benchmarks test_true_async.py

clean:
	rm -rf $(VENV) build *.egg-info
