# Two entry points: `make demo` and `make test`. Both create .venv on first use and
# re-install only when pyproject.toml changed (the stamp file tracks it).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mmbench prepare synthetic
	$(BIN)/mmbench sweep recipes/quickstart.yaml
	$(BIN)/mmbench report --compare --sweep quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/step_throughput.py

clean:
	rm -rf $(VENV) data results.db runs
