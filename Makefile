# Two commands on a fresh machine: `make demo` (set up, then run the main job) and `make test`.
# Both are idempotent; the second time, setup is skipped unless requirements.txt or pyproject.toml changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.distcnn-installed
DEMO_ARGS ?= --model simplecnn --policy paper --nproc-per-node 2 --epochs 2 --train-subset 10000

.PHONY: setup data demo test bench clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

data:
	@bash scripts/ensure-fashion-mnist.sh

demo: setup data
	$(PY) -m distcnn train $(DEMO_ARGS)

test: setup data
	$(PY) -m pytest -q

bench: setup data
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
