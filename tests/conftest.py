"""Shared fixtures. Helpers that tests import are in helpers.py; this file holds only fixtures, and the one
setting every process of the suite shares."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

# Before torch loads (here and in every process the tests start): OpenMP threads that wait for each other sleep
# instead of spinning. With one core of two kept busy by other work, a run of two threads spun at every operator
# for a core it could not have: a 3-epoch study run took 4.6 to 50 s instead of 1.5 to 2.5 s (one test 110 s
# instead of 12). Only speed changes; on an idle machine it costs a 2-thread simplecnn step about 25 %.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
from helpers import (CAN_BUILD_CLUSTER, TWO_HOSTS_RATE, TWO_RANKS, read_summary, run_cli,  # noqa: E402
                     run_study, written_report)

# What this machine has only one of: the emulated cluster (its hosts' namespaces and bridge). A test that
# brings it up (marked `emulated_cluster`, or through the two_node_slurm fixture) holds this lock while it
# runs: a test on another pytest-xdist worker (`make test` runs two), or in another pytest on this machine,
# that needs the cluster waits for it. (Tests marked `alone` measure what every process shares: `make test`
# runs them after the others, by themselves.)
EMULATED_CLUSTER_LOCK = Path(tempfile.gettempdir()) / "distcnn-tests-emulated-cluster.lock"


@contextlib.contextmanager
def held(lock_file: Path):
    """`lock_file` locked by this process alone (others wait); released when it closes, or the process dies."""
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def emulated_cluster_held():
    return held(EMULATED_CLUSTER_LOCK)


@pytest.fixture(autouse=True)
def one_emulated_cluster_at_a_time(request):
    if request.node.get_closest_marker("emulated_cluster") is None:
        yield
        return
    with emulated_cluster_held():
        yield


@contextlib.contextmanager
def made_once(tmp_path_factory, name: str):
    """A folder for what a session fixture makes, made once for the whole run: under `pytest -n` the workers
    share it (the first to get here makes it, under a lock; the others wait, then read it). Yields (folder,
    whether it still has to be made); a fixture that fails leaves it to be made again."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    # with workers, each one's base temp folder is in the run's own; without, the base is the run's own
    root = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()
    folder, done = root / name, root / f"{name}.done"
    with held(root / f"{name}.lock"):
        to_make = not done.exists()
        if to_make:
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
        yield folder, to_make
        done.touch()


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """One real 2^2 x 2 study (helpers.TINY_STUDY: policy x model, one epoch each) run through the CLI, shared
    by the study and report tests (of every worker). Read it, never change it: copy it first
    (helpers.copy_study)."""
    with made_once(tmp_path_factory, "tiny-study") as (folder, to_make):
        return run_study(folder) if to_make else folder / "out"


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory):
    """One real 2-rank gloo run through torchrun (allreduce hook, simplecnn), shared by the DDP and accounting
    tests (of every worker): (run directory, summary). Read it, never change it."""
    with made_once(tmp_path_factory, "two-ranks") as (folder, to_make):
        out = folder / "allreduce"
        if to_make:
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


@pytest.fixture(scope="module")
def two_node_slurm(tmp_path_factory):
    """A real two-node Slurm cluster on two emulated hosts (tests/slurm_cluster.py): a slurmd in each host's
    network namespace (nodes distcnn-h1, distcnn-h2), the controller on the first; `.kill_node(node)`,
    `.start_node(node)` and the one-node cluster's `.env`, `.run(...)`. Module-scoped: the emulated cluster is
    this machine's one, so the hosts come up and go down with the module. Skips with the reason where the
    machine cannot run it."""
    from slurm_cluster import ClusterUnavailable, start_cluster

    from distcnn import cluster
    from distcnn.errors import UsageError

    if not CAN_BUILD_CLUSTER:
        pytest.skip("the two-node Slurm cluster runs on the emulated hosts: it needs root and iproute2")
    with emulated_cluster_held():  # the emulated cluster is this machine's one
        try:
            hosts = cluster.up(2)
        except UsageError as reason:
            pytest.skip(f"no emulated hosts for the two-node Slurm cluster: {reason}")
        try:
            try:
                slurm = start_cluster(tmp_path_factory.mktemp("slurm2"), hosts=hosts)
            except ClusterUnavailable as reason:
                pytest.skip(f"no two-node Slurm cluster: {reason}")
            try:
                yield slurm
            finally:
                slurm.stop()
        finally:
            cluster.down()


@pytest.fixture(scope="session")
def two_host_run(tmp_path_factory):
    """One real 2-node job (lenet, 2 epochs) through the CLI on two emulated hosts brought up with
    `distcnn cluster up --hosts 2 --bandwidth 1gbit` and taken down after it, shared by the cluster test of
    its traffic and bytes and the forecast's check of a real run (of every worker): its run directory. Read it,
    never change it. Skips where the machine cannot build the emulated hosts."""
    if not CAN_BUILD_CLUSTER:
        pytest.skip("the emulated cluster needs root and iproute2 (ip, tc)")
    with made_once(tmp_path_factory, "two-hosts") as (folder, to_make):
        out = folder / "run"
        if to_make:
            with emulated_cluster_held():  # the emulated cluster is this machine's one
                try:
                    up = run_cli("cluster", "up", "--hosts", "2", "--bandwidth", TWO_HOSTS_RATE)
                    assert up.returncode == 0, up.stderr
                    job = run_cli("train", "--cluster", "emulated", "--nnodes", "2", "--nproc-per-node", "1",
                                  "--data", "synthetic:n=1200", "--model", "lenet", "--epochs", "2",
                                  "--batch-size", "32", "--sample-interval", "0.1", "--out", str(out), timeout=600)
                    assert job.returncode == 0, job.stderr[-3000:]
                finally:
                    run_cli("cluster", "down")
        return out
