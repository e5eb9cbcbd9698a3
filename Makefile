# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)
export JAX_PLATFORMS ?= cpu
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install demo demo-mining test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,tpu-aot]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m samtone_jax.demo

# Stage 1 -> mine hard negatives with it -> stage 2 (and a control), on the embedded man pages.
demo-mining: install
	$(PY) -m samtone_jax.demo_mining

# Two workers: the suite mixes CPU-bound compiles with subprocess start-ups; -n 2 keeps both cores busy.
test: install
	$(PY) -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) build *.egg-info
