"""Studies through a real one-node Slurm cluster (the `slurm_cluster` fixture): every run is a job submitted with
submitit, recorded once when it ends; a study process killed and started again re-attaches to its jobs instead
of submitting them again; a job cancelled with scancel is retried, then recorded failed with Slurm's state.
Skipped, with the reason, where the machine cannot run the cluster."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, TINY_STUDY, run_cli, write_study
from test_study import runs_in

pytestmark = pytest.mark.slow


def slurm_study(cluster, epochs: int = 1, policies: str = '["none", "flip-crop"]') -> str:
    """The tiny 2x2 study (one replicate) as Slurm jobs of one CPU each, watched every half second."""
    return (TINY_STUDY.replace("replicates = 2", "replicates = 1").replace("epochs = 1", f"epochs = {epochs}")
            .replace('policy = ["none", "flip-crop"]', f"policy = {policies}")
            .replace("[study]", '[study]\nexecutor = "slurm"')
            + f'[slurm]\npartition = "{cluster.partition}"\ntime = 10\ncpus_per_task = 1\npoll_seconds = 0.5\n')


def start_study(spec_file, out, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distcnn", "study", str(spec_file), "--out", str(out),
                             "--no-report"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def known_runs(out) -> list[dict]:
    try:
        return runs_in(out)
    except Exception:  # noqa: BLE001 — study.db not written yet
        return []


def test_a_study_through_slurm_then_killed_and_restarted_records_every_run_once(slurm_cluster, tmp_path):
    """The 2x2 study as one job array; the study process is killed once every job is submitted and before all
    have ended; started again, it re-attaches (the same job ids), records every run once, submits nothing."""
    import os

    env = os.environ | slurm_cluster.env
    spec_file = write_study(tmp_path, slurm_study(slurm_cluster, epochs=2))
    out = tmp_path / "s"
    study = start_study(spec_file, out, env)
    try:
        submitted = wait_for(lambda: (runs := known_runs(out)) and all(r["job_id"] for r in runs) and runs,
                             120, "every run submitted")
    finally:
        study.send_signal(signal.SIGKILL)
        study.wait()
    assert not any(r["status"] == "done" for r in runs_in(out)), "killed before any run was recorded"
    jobs = {r["run_id"]: r["job_id"] for r in submitted}
    assert len({job.split("_")[0] for job in jobs.values()}) == 1, "one job array"
    resumed = run_cli("study", str(spec_file), "--out", str(out), "--no-report", env=slurm_cluster.env,
                      timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.count("re-attached to Slurm job") == 4 and "submitted" not in resumed.stdout
    runs = runs_in(out)
    assert all(r["status"] == "done" and r["summary"] and r["attempts"] == 1 for r in runs)
    assert {r["run_id"]: r["job_id"] for r in runs} == jobs, "nothing submitted again"
    for run in runs:
        environment = json.loads((out / "runs" / run["run_id"] / "environment.json").read_text())
        assert environment["slurm_job_id"] == run["job_id"], "the run says which job trained it"
    status = run_cli("study", str(spec_file), "--out", str(out), "--status", env=slurm_cluster.env)
    assert status.returncode == 0 and all(job in status.stdout for job in jobs.values())


def test_a_cancelled_job_is_retried_then_recorded_failed(slurm_cluster, tmp_path):
    import os

    env = os.environ | slurm_cluster.env
    text = slurm_study(slurm_cluster, epochs=500, policies='["none"]').replace('model = ["lenet", "simplecnn"]',
                                                                              'model = ["lenet"]')
    text = text.replace('design = "2k"', 'design = "full"')
    spec_file = write_study(tmp_path, text)
    out = tmp_path / "c"
    study = start_study(spec_file, out, env)
    cancelled = []
    try:
        for attempt in (1, 2):
            run = wait_for(lambda: (runs := known_runs(out)) and runs[0]["attempts"] == attempt
                           and runs[0]["job_state"] == "RUNNING" and runs[0], 120, f"attempt {attempt} running")
            slurm_cluster.run("scancel", run["job_id"])
            cancelled.append(run["job_id"])
        output, _ = study.communicate(timeout=120)
    finally:
        if study.poll() is None:
            study.kill()
            study.wait()
    assert study.returncode == 1, output  # a study with a failed run says so in its exit code
    (run,) = runs_in(out)
    assert run["status"] == "failed" and run["attempts"] == 2 and len(set(cancelled)) == 2
    assert f"Slurm job {cancelled[1]} CANCELLED" in run["error"], run["error"]
    assert "0/1 runs done, 1 failed" in output


def test_a_study_killed_between_sbatch_and_recording_the_job_ids_finds_its_jobs_by_name(slurm_cluster, tmp_path,
                                                                                         monkeypatch, capsys):
    """The window between sbatch and study.db's job ids: the study dies there (here: the recording raises the
    KeyboardInterrupt a Ctrl-C would); started again, it finds the job array by the name recorded before sbatch
    and attaches to it: nothing is submitted twice, every run is recorded once."""
    from helpers import cli

    from distcnn.study.store import StudyStore

    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    spec_file = write_study(tmp_path, slurm_study(slurm_cluster))
    out = tmp_path / "w"
    recorded = StudyStore.set_jobs

    def killed(self, jobs):
        raise KeyboardInterrupt

    monkeypatch.setattr(StudyStore, "set_jobs", killed)
    assert cli(capsys, "study", str(spec_file), "--out", str(out), "--no-report")[0] == 130
    assert all(run["job_id"] is None and run["job_name"] for run in runs_in(out)), "sbatch ran, no id recorded"
    monkeypatch.setattr(StudyStore, "set_jobs", recorded)
    code, stdout, stderr = cli(capsys, "study", str(spec_file), "--out", str(out), "--no-report")
    assert code == 0, stdout + stderr
    assert stdout.count("found its Slurm job") == 4 and "submitted" not in stdout, stdout
    runs = runs_in(out)
    assert all(run["status"] == "done" and run["attempts"] == 1 for run in runs)
    names = {run["job_name"].split("#")[0] for run in runs}  # the one submission's name, recorded before sbatch
    listed = slurm_cluster.run("squeue", "--states=all", "--noheader", "--format=%F %j").stdout.splitlines()
    arrays = {line.split()[0] for line in listed if line.split()[-1] in names}
    assert len(names) == 1 and {run["job_id"].split("_")[0] for run in runs} == arrays, "one submission"
