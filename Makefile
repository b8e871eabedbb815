# Set-up from a fresh clone is these two commands: `make demo` and `make test`.
# Both create .venv on first use. The CPU build of torch is pinned here (dev/CI set-up only); pyproject keeps a range.
PY ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench lint

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,spark]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/reldl demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_generate.py --preset cpu

lint: $(BIN)/.installed
	$(BIN)/ruff format --check . && $(BIN)/ruff check .
