"""Shared fixtures. Helpers that tests import are in helpers.py; this file holds only fixtures."""

from __future__ import annotations

import pytest
from helpers import TWO_RANKS, read_summary, run_cli, run_study, written_report


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """One real 2^2 x 2 study (helpers.TINY_STUDY: policy x model, one epoch each) run through the CLI, shared
    by the study and report tests. Read it, never change it: copy it first (helpers.copy_study)."""
    return run_study(tmp_path_factory.mktemp("tiny-study"))


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory):
    """One real 2-rank gloo run through torchrun (allreduce hook, simplecnn), shared by the DDP and accounting
    tests: (run directory, summary). Read it, never change it."""
    out = tmp_path_factory.mktemp("two-ranks") / "allreduce"
    result = run_cli("train", *TWO_RANKS, "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, read_summary(out)


@pytest.fixture(scope="module")
def report(study):
    """The report of the module's own `study` fixture, written into that study: (HTML, Markdown)."""
    return written_report(study)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node Slurm cluster (tests/slurm_cluster.py): `.env` (SLURM_CONF, PATH with the sacct test
    stand-in first) to merge into the environment of whatever calls sbatch, `.partition`, `.conf_path`,
    `.node`, `.cpus`, `.run(...)`. Skips with the reason where the machine cannot run Slurm; stops the
    daemons and leftover jobs by pid at the end."""
    from slurm_cluster import ClusterUnavailable, start_cluster

    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except ClusterUnavailable as reason:
        pytest.skip(f"no one-node Slurm cluster: {reason}")
    try:
        yield cluster
    finally:
        cluster.stop()
