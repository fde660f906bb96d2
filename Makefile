# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv, install batchfit, run `batchfit tune` on the built-in example
#   make test   - create .venv, install batchfit with test tools, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.batchfit-installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[cpu,plot,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/batchfit tune --plot demo.png

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) bench/bench_max.py

clean:
	rm -rf $(VENV) .pytest_cache
