"""How a study's runs are executed: several at once on this machine (--parallel N, pinned to disjoint cores),
or as Slurm jobs (the study file's [slurm] table and flags, a multi-node run's rendezvous from the job's
nodes). The jobs themselves on a real one-node Slurm: test_study_slurm.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distcnn.config import make_config
from distcnn.errors import UsageError
from distcnn.study import slurm
from distcnn.study.spec import load_spec, parse_spec
from distcnn.study.store import load_runs_table
from helpers import ROOT, TINY_STUDY as TINY, cli, run_cli, usage_error, write_study
from test_study import runs_in

ONE_REPLICATE = TINY.replace("replicates = 2", "replicates = 1")


@pytest.mark.parametrize("text, message", [
    (TINY.replace("[study]", '[study]\nexecutor = "slurn"'), "executor 'slurn' is not one of local, slurm (nearest: slurm"),
    (TINY.replace("[study]", "[study]\nparallel = 0"), "[study] parallel must be at least 1"),
    (TINY.replace("[study]", '[study]\nexecutor = "slurm"\nparallel = 2'), "parallel is for the local executor"),
    (TINY + '[slurm]\npartiton = "gpu"\n', "unknown option 'partiton' (nearest: partition"),
    (TINY + '[slurm]\ntime = "2 hours"\n', "time '2 hours': give minutes"),
    (TINY + "[slurm]\ngpus_per_node = \"four\"\n", "gpus_per_node: expected an integer"),
])
def test_a_bad_execution_setting_is_one_clear_line(tmp_path, text, message):
    with pytest.raises(UsageError) as error:
        load_spec(write_study(tmp_path, text))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("value, expected", [(90, 90), ("90", 90), ("01:30:00", 90), ("1-00:00:00", 1440),
                                             ("00:00:30", 1), ("2:15", 135)])
def test_slurm_time_limits_are_read_as_sbatch_reads_them(value, expected):
    assert slurm.minutes(value) == expected


def test_the_executor_is_how_runs_execute_not_what_the_study_is(tmp_path):
    """The flags set executor and [slurm] over the file; neither is part of the study's identity, so a study
    started here can go on through Slurm."""
    path = write_study(tmp_path, TINY + '[slurm]\npartition = "cpu"\ntime = "00:10:00"\n')
    spec = load_spec(path, {"executor": "slurm", "slurm": {"partition": "gpu", "sbatch": {"qos": "high"}}})
    assert spec.executor == "slurm" and spec.slurm == {"partition": "gpu", "time": 10, "sbatch": {"qos": "high"}}
    assert spec.as_dict() == load_spec(path).as_dict()


def test_a_multi_node_run_under_slurm_meets_at_its_jobs_first_node():
    """nnodes = 2 needs no hand-typed endpoint under Slurm: the study records a placeholder, and each task of
    the job puts in the job's first node, a port of the job, and its node's rank."""
    text = TINY.replace("[base]", "[base]\nnnodes = 2").replace("[study]", '[study]\nexecutor = "slurm"')
    spec = parse_spec(text, "multi")
    config = spec.run_config(spec.configurations()[0], 0, "/tmp/x", "c00-r1")
    assert config.rdzv_endpoint.startswith(slurm.FIRST_NODE)
    with pytest.raises(UsageError, match="rdzv_endpoint"):
        parse_spec(text.replace('executor = "slurm"', 'executor = "local"'), "multi")
    environ = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NODEID": "1", "SLURM_JOB_ID": "4242"}
    on_node = slurm.job_config(config, environ)
    assert on_node.rdzv_endpoint == f"gpu07:{slurm.PORT_BASE + 4242}"
    assert on_node.node_rank == 1 and on_node.rdzv_id == "slurm-4242"
    parameters = slurm.job_parameters({"gpus_per_node": 4, "time": 30, "sbatch": {"mail-type": "END"}}, config, "j")
    assert parameters | {"cpus_per_task": None} == {
        "job_name": "j", "nodes": 2, "ntasks_per_node": 1, "time": 30, "cpus_per_task": None, "gpus_per_node": 4,
        "additional_parameters": {"mail_type": "END", "no_requeue": True}, "srun_args": ["--kill-on-bad-exit=1"]}
    asked = slurm.job_parameters({"sbatch": {"requeue": True}}, single_node := make_config({}), "j")
    assert asked["additional_parameters"] == {"requeue": True} and "srun_args" not in asked, \
        "the user's own requeue choice stands; one node has no peers to end"
    assert single_node.nnodes == 1
    single = make_config({"data": "synthetic:n=300"})
    assert slurm.job_config(single, environ) is single, "one machine: nothing to fill in"


def test_more_parallel_runs_than_cores_is_refused_in_one_line(tmp_path, capsys):
    too_many = len(os.sched_getaffinity(0)) + 1
    line = usage_error(capsys, "study", write_study(tmp_path, ONE_REPLICATE), "--out", tmp_path / "s",
                       "--parallel", str(too_many), "--no-report")
    assert f"--parallel {too_many}: this machine has" in line and "at most" in line


@pytest.mark.slow
def test_parallel_runs_finish_every_run_once_on_disjoint_cores(tmp_path):
    """--parallel 2 on a 4-run study: every run done once; runs that ran side by side were pinned to disjoint
    cores, each says so in its environment, and the runs table can block on it."""
    spec_file = write_study(tmp_path, ONE_REPLICATE)
    out = tmp_path / "p"
    done = run_cli("study", str(spec_file), "--out", str(out), "--parallel", "2", "--no-report", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = runs_in(out)
    assert [r["status"] for r in runs] == ["done"] * 4 and all(r["attempts"] == 1 for r in runs)
    placements = {r["run_id"]: json.loads(r["placement"]) for r in runs}
    cores = len(os.sched_getaffinity(0))
    for run_id, placement in placements.items():
        assert placement["parallel"] == 2 and len(placement["cpus"]) == cores // 2
        environment = json.loads((out / "runs" / run_id / "environment.json").read_text())
        assert environment["cpu_affinity"] == placement["cpus"] and environment["threads_per_rank"] == cores // 2
        assert environment["placement"]["slot"] == placement["slot"]
        for other in placement["alongside"]:
            assert not set(placement["cpus"]) & set(placements[other]["cpus"]), "side by side on disjoint cores"
            assert run_id in placements[other]["alongside"]
    assert any(p["alongside"] for p in placements.values()), "two runs ran at once"
    rows, _ = load_runs_table(out)
    assert {row["run_id"]: row["runs_alongside"] for row in rows} == {
        run_id: len(p["alongside"]) for run_id, p in placements.items()}
    from distcnn.study.report import write_report

    _, markdown = write_report(out)
    assert "ran side by side on one machine" in Path(markdown).read_text()


@pytest.mark.slow
def test_a_killed_parallel_study_leaves_no_run_process_and_resumes(tmp_path):
    """SIGKILL of the study process alone: its runs' processes end with it (they are children of a fork
    server, not of the study); run again, every run is done once."""
    slow = ONE_REPLICATE.replace("epochs = 1", "epochs = 15")
    spec_file = write_study(tmp_path, slow)
    out = tmp_path / "k"
    study = subprocess.Popen([sys.executable, "-m", "distcnn", "study", str(spec_file), "--out", str(out),
                              "--parallel", "2", "--no-report"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list((out / "runs").glob("*/epochs.csv"))) < 2:
            time.sleep(0.2)
        assert len(list((out / "runs").glob("*/epochs.csv"))) >= 2, "two runs under way"
    finally:
        study.send_signal(signal.SIGKILL)
        study.wait()
    deadline = time.monotonic() + 15
    while (survivors := living_in_session(study.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not survivors, f"run processes outlived the study: {survivors}"
    interrupted = [r["run_id"] for r in runs_in(out) if r["status"] == "running"]
    assert interrupted, "killed while runs were under way"
    resumed = run_cli("study", str(spec_file), "--out", str(out), "--parallel", "2", "--no-report", timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    runs = runs_in(out)
    assert all(r["status"] == "done" for r in runs)
    assert sum(r["attempts"] for r in runs) == 4 + len(interrupted)


def living_in_session(session: int) -> list[str]:
    """The processes of a session that still run (an exited one waits for init as a zombie: it runs nothing)."""
    listing = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-s", str(session)], capture_output=True, text=True)
    return [line for line in listing.stdout.splitlines() if line.split()[1][0] != "Z"]


def test_status_shows_each_run_and_its_job(tmp_path, capsys):
    spec_file = write_study(tmp_path, ONE_REPLICATE)
    assert "not a study directory" in usage_error(capsys, "study", spec_file, "--out", tmp_path / "none", "--status")
    from distcnn.study.runner import StudyRunner

    runner = StudyRunner(load_spec(spec_file), tmp_path / "s")
    try:
        first = runner.store.runs()[0]["run_id"]
        runner.store.claim(first, tmp_path / "s" / "runs" / first, runner.owner)
        runner.store.set_jobs({first: "1234_0"})
    finally:
        runner.close()
    code, out, _ = cli(capsys, "study", spec_file, "--out", tmp_path / "s", "--status")
    assert code == 0
    lines = out.splitlines()
    assert "4 runs, 0 done, 1 running, 0 failed, 3 pending" in lines[0]
    assert any(line.startswith(first) and "1234_0" in line and "SUBMITTED" in line for line in lines)
    assert sum(line.startswith("c0") for line in lines) == 4


def test_inside_a_slurm_job_a_run_uses_the_cpus_it_was_given(monkeypatch):
    """A cluster without task pinning leaves the affinity at the whole node: threads follow the job's CPUs."""
    from distcnn.config import available_cores

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert available_cores() == cores, "outside a job the variable means nothing"
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert available_cores() == 1
    assert make_config({"data": "synthetic:n=300"}).threads_per_rank() == 1
