# Two commands on a fresh machine: `make demo` (set up, then run the main job: the built-in cost study and
# its report) and `make test`.
# Both are idempotent; the second time, setup is skipped unless requirements.txt or pyproject.toml changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.distcnn-installed
STUDY ?=  # a study file; empty: the built-in cost study

.PHONY: setup data slurm slurm-cluster slurm-cluster-down demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

data:
	@bash scripts/ensure-fashion-mnist.sh

slurm:  # Slurm + munge for the test clusters (tests/slurm_cluster.py); root only
	@bash scripts/ensure-slurm.sh

SLURM_NODES ?= 2
SLURM_DIR ?= /tmp/distcnn-slurm
slurm-cluster: setup slurm  # a Slurm cluster to try by hand: SLURM_NODES=2 slurmds on two emulated hosts
	$(PY) tests/slurm_cluster.py up --nodes $(SLURM_NODES) $(SLURM_DIR)

slurm-cluster-down:
	$(PY) tests/slurm_cluster.py down $(SLURM_DIR)

demo: setup data
	$(PY) -m distcnn study $(STUDY)

test: setup data slurm  # on TEST_WORKERS (2) pytest workers, then the tests marked `alone` by themselves
	PY=$(PY) bash scripts/pytest-phases.sh

test-fast: setup data slurm
	PY=$(PY) bash scripts/pytest-phases.sh "not slow"

bench: setup data
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
