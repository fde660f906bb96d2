# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv, install batchfit, run `batchfit tune` on the built-in example
#   make test   - create .venv, install batchfit with test tools, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.batchfit-installed
# KerasHub, for the tests and benchmarks on real models. Installed without its declared
# dependencies: keras-hub requires tensorflow-text, which pulls a full `tensorflow` other than the
# pinned tensorflow-cpu. Building models from their config needs only these (no tokenizer run,
# no preset download); versions are pinned in constraints.txt.
HUB_PACKAGES := keras-hub regex tokenizers

.PHONY: demo test test-fast test-jax lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[cpu,jax,plot,test]"
	$(PY) -m pip install --quiet --no-deps -c constraints.txt $(HUB_PACKAGES)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/batchfit tune --plot demo.png

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples

# tests/jax run in a pytest of their own: Keras reads KERAS_BACKEND once, at import, so one
# process cannot hold the TensorFlow suite and the JAX one (tests/conftest.py leaves tests/jax
# out of a run whose KERAS_BACKEND is not jax).
test: lint
	KERAS_BACKEND=tensorflow $(PY) -m pytest
	KERAS_BACKEND=jax $(PY) -m pytest tests/jax

test-jax: $(STAMP)
	KERAS_BACKEND=jax $(PY) -m pytest tests/jax

# unit/ and integration/ only (tests/process/ is marked slow by folder): under 2 minutes
test-fast: lint
	KERAS_BACKEND=tensorflow $(PY) -m pytest -m "not slow"
	KERAS_BACKEND=jax $(PY) -m pytest tests/jax -m "not slow"

bench: $(STAMP)
	$(PY) bench/bench_max.py

clean:
	rm -rf $(VENV) .pytest_cache
