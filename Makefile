# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)
export JAX_PLATFORMS ?= cpu
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install demo demo-mining demo-architectures demo-skill test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,tpu-aot]'
	touch $(STAMP)

install: $(STAMP)

# SEEDS=N repeats every run with SEED = 0 .. N-1 (mean metrics, tests pooled over seeds).
SEEDS ?= 2
ARCHITECTURE_SEEDS ?= 1

demo: install
	$(PY) -m samtone_jax.demo --seeds=$(SEEDS)

# SDE, ADE and ADE-SPL, each with in-batch softmax and SamToNe; probes of ADE.
demo-architectures: install
	$(PY) -m samtone_jax.demo --architectures --seeds=$(ARCHITECTURE_SEEDS)

# Stage 1 -> mine hard negatives with it -> stage 2 (and a control), on the embedded man pages.
demo-mining: install
	$(PY) -m samtone_jax.demo_mining

# SKILL: tiny T5 on the WordNet questions alone vs. infused with the WordNet KG then fine-tuned.
demo-skill: install
	$(PY) -m samtone_jax.demo_skill

# Two workers: the suite mixes CPU-bound compiles with subprocess start-ups; -n 2 keeps both cores busy.
test: install
	$(PY) -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) build *.egg-info
