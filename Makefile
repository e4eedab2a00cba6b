# `make demo` and `make test` each create or update .venv first. PY can point at another Python 3.10+.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,genai]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mlexport export --target executorch --quant 4bit --force
	$(BIN)/mlexport run out/demo-executorch-4bit --prompt "What is the capital of France?"

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -rs --durations=15 -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/export_demo.py

clean:
	rm -rf out dist .pytest_cache
