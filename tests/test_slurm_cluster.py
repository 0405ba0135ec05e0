"""The one-node Slurm cluster fixture (tests/slurm_cluster.py) works with submitit: a function's result, a job
array whose two 1-CPU tasks run side by side, a job cancelled with scancel comes back CANCELLED and its
result raises instead of hanging (the sacct stand-in), and a 2-task job sees ranks 0 and 1."""

from __future__ import annotations

import time

import pytest

submitit = pytest.importorskip("submitit")
from submitit.core import core  # noqa: E402
from submitit.slurm import slurm  # noqa: E402

WAIT_S = 20


@pytest.fixture
def executor(slurm_cluster, tmp_path, monkeypatch):
    """An AutoExecutor on the test cluster, with fast polling: submitit calls sbatch/sacct/scancel with
    os.environ, so the cluster's env goes there; the shared SlurmInfoWatcher polls sacct at most every 2 s
    at first and up to every 600 s later (delay_s), fresh here at 0.5 s; a finished job without a result
    file is waited on for 15 s (_results_timeout_s), 1 s here."""
    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(slurm.SlurmJob, "watcher", slurm.SlurmInfoWatcher(delay_s=0.5))
    monkeypatch.setattr(core.Job, "_results_timeout_s", 1)
    ex = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    ex.update_parameters(timeout_min=5, slurm_partition=slurm_cluster.partition, cpus_per_task=1)
    return ex


def wait_done(job, timeout: float = WAIT_S):
    """Poll like job.wait(), but fail instead of hanging."""
    deadline = time.monotonic() + timeout
    while not job.done():
        assert time.monotonic() < deadline, f"job {job.job_id} not done in {timeout} s (state {job.state})"
        time.sleep(0.1)
    return job


def final_state(job, timeout: float = 5) -> str:
    """Slurm's state once the job has ended: the result file is written before the job ends, so right after
    result() submitit may still read RUNNING or COMPLETING."""
    deadline = time.monotonic() + timeout
    while (state := job.get_info(mode="force").get("State", "UNKNOWN")) in ("PENDING", "RUNNING", "COMPLETING"):
        assert time.monotonic() < deadline, f"job {job.job_id} still {state}"
        time.sleep(0.2)
    return state


def test_function_result(executor):
    def double(x):  # nested: cloudpickle sends it by value (the job cannot import this test module)
        import os

        return 2 * x, os.environ["SLURM_JOB_ID"]

    start = time.monotonic()
    job = executor.submit(double, 21)
    value, job_id = wait_done(job).result()
    print(f"submit -> result of a trivial function: {time.monotonic() - start:.2f} s")
    assert (value, job_id) == (42, job.job_id)
    assert final_state(job) == "COMPLETED"


def test_job_array_runs_two_at_once(executor):
    def span(seconds):
        import time

        start = time.time()
        time.sleep(seconds)
        return start, time.time()

    jobs = executor.map_array(span, [1.5, 1.5])
    assert [j.job_id for j in jobs] == [f"{jobs[0].job_id.split('_')[0]}_{i}" for i in (0, 1)]
    (start0, end0), (start1, end1) = [wait_done(j).result() for j in jobs]
    assert max(start0, start1) < min(end0, end1), "the two 1-CPU tasks did not run side by side"
    assert [final_state(j) for j in jobs] == ["COMPLETED", "COMPLETED"]


def test_cancelled_job_comes_back_cancelled(executor, slurm_cluster):
    def sleep():
        import time

        time.sleep(120)

    job = executor.submit(sleep)
    deadline = time.monotonic() + WAIT_S
    while job.watcher.get_state(job.job_id, mode="force") != "RUNNING":
        assert time.monotonic() < deadline, f"job never ran: {job.state}"
        time.sleep(0.2)
    slurm_cluster.run("scancel", job.job_id)
    wait_done(job)
    assert job.state.split()[0] == "CANCELLED"
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        job.result()


def test_two_tasks_see_their_ranks(executor):
    def rank():
        import os

        import submitit

        return int(os.environ["SLURM_PROCID"]), submitit.JobEnvironment().global_rank, os.environ["SLURM_NTASKS"]

    executor.update_parameters(tasks_per_node=2)
    job = executor.submit(rank)
    assert wait_done(job).results() == [(0, 0, "2"), (1, 1, "2")]


def test_sacct_stand_in_formats(slurm_cluster):
    """The stand-in answers as sacct does: header, array tasks as <id>_<n>, exit codes, unknown ids silent."""
    sbatch = ("sbatch", "--parsable", f"--output={slurm_cluster.root}/%j.out")
    failed = slurm_cluster.run(*sbatch, "--wrap", "exit 3").stdout.strip()
    array = slurm_cluster.run(*sbatch, "--array=0-1", "--wrap", "true").stdout.strip()
    deadline = time.monotonic() + WAIT_S
    while slurm_cluster.run("squeue", "--noheader", "--jobs", f"{failed},{array}").stdout.strip():
        assert time.monotonic() < deadline, "jobs did not finish"
        time.sleep(0.2)
    out = slurm_cluster.run("sacct", "-o", "JobID,State,ExitCode", "--parsable2", "-j", failed, "-j", array,
                            "-j", "999999").stdout.splitlines()
    assert out[0] == "JobID|State|ExitCode"
    assert sorted(out[1:]) == sorted([f"{array}_0|COMPLETED|0:0", f"{array}_1|COMPLETED|0:0", f"{failed}|FAILED|3:0"])
