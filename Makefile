# memlens: `make demo` runs the main job on the embedded default, `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench notebooks clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,eval]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/memlens demo --out memlens-report

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff, and the import contract of docs/architecture.md (also part of `make test`)
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_architecture.py

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

# re-execute examples/*.ipynb on the default organism and store their outputs in place
notebooks: $(STAMP)
	$(BIN)/python examples/run_notebooks.py

clean:
	rm -rf $(VENV) memlens-report .pytest_cache
