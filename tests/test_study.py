"""Studies: the study file is checked before anything runs, the design is expanded and randomised, every
configuration × replicate is recorded exactly once — also when the study is killed and run again.

The bookkeeping (reruns, retries, resuming) is checked on a stubbed trainer (helpers.stub_training); what real runs
record, on the shared real study (the `tiny_study` fixture) and on one real study killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distcnn.errors import UsageError, WorkersFailed
from distcnn.study.runner import StudyRunner, plan_runs
from distcnn.study.spec import load_spec, parse_spec
from distcnn.study.store import load_runs_table
from helpers import ROOT, TINY_STUDY as TINY, cli, run_cli, stub_training, usage_error, write_study

LEVELS = {"policy": ["none", "flip-crop"], "model": ["lenet", "simplecnn"]}


@pytest.mark.parametrize("text, message", [
    (TINY.replace("epochs = 1", "epohcs = 1"), "unknown option 'epohcs' (nearest: epochs"),
    (TINY.replace("policy = [", "polcy = ["), "unknown option 'polcy' (nearest: policy"),
    (TINY.replace('policy = ["none", "flip-crop"]', "policy = []"), "non-empty list of levels"),
    (TINY.replace('"simplecnn"]', '"simplecnn", "deepcnn"]'), 'design "2k" needs two levels'),
    (TINY.replace('"simplecnn"]', '"lenet"]'), "a level is listed twice"),
    (TINY.replace('"cpu_percent_mean"', '"cpu_precent_mean"'), "unknown response 'cpu_precent_mean' (nearest: cpu_percent_mean"),
    (TINY.replace("[study]", "[studdy]"), "unknown section [studdy]"),
    (TINY.replace("epochs = 1", "epochs = 0"), "--epochs"),
    (TINY.replace("epochs = 1", "seed = 3"), "set [study] seed"),
    (TINY.replace('design = "2k"', 'design = "fractional"'), "not one of full, 2k"),
])
def test_a_bad_study_file_is_one_clear_line(tmp_path, text, message):
    with pytest.raises(UsageError) as error:
        load_spec(write_study(tmp_path, text))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_input_from_the_command_line_runs_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    bad_model = write_study(tmp_path, TINY.replace('"simplecnn"]', '"simplecnnn"]'))
    line = usage_error(capsys, "study", bad_model, "--out", out)
    assert line.startswith("distcnn: error: configuration policy=none model=simplecnnn: unknown model 'simplecnnn'")
    assert not (out / "study.db").exists(), "nothing run, nothing recorded"
    assert "does not exist" in usage_error(capsys, "study", tmp_path / "nope.toml")


def test_the_design_expands_every_configuration_and_replicate_in_a_seeded_random_order():
    spec = parse_spec(TINY.replace("replicates = 2", "replicates = 3"), "tiny")
    planned = plan_runs(spec)
    assert len(planned) == 4 * 3
    assert len({(tuple(p["levels"].items()), p["replicate"]) for p in planned}) == 12
    assert sorted(p["run_order"] for p in planned) == list(range(12))
    assert {p["replicate"]: p["seed"] for p in planned} == {1: 0, 2: 1, 3: 2}, "one seed per replicate"
    assert [p["run_id"] for p in planned] == [p["run_id"] for p in plan_runs(spec)], "seeded: the same order again"
    product_order = sorted(planned, key=lambda p: (p["config_index"], p["replicate"]))
    assert [p["run_id"] for p in planned] != [p["run_id"] for p in product_order], "randomised"


@pytest.mark.slow
def test_a_real_study_trains_and_records_every_run_once(tiny_study):
    rows, order = load_runs_table(tiny_study)
    assert len(rows) == 8 and order == LEVELS
    accuracies = [row["test_accuracy"] for row in rows]
    assert all(0 <= a <= 1 for a in accuracies) and sum(accuracies) / 8 > 0.25, "the runs trained (chance: 0.1)"
    assert all(row["cpu_percent_mean"] is not None for row in rows)
    runs = runs_in(tiny_study)
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in runs)
    for run in runs:  # each run's own record, with one row per epoch
        assert len((tiny_study / "runs" / run["run_id"] / "epochs.csv").read_text().splitlines()) == 1 + 1


def test_a_study_runs_once_and_running_it_again_reruns_nothing(tmp_path, monkeypatch, capsys):
    calls = stub_training(monkeypatch)
    out, spec_file = tmp_path / "study", write_study(tmp_path)
    code, stdout, stderr = cli(capsys, "study", spec_file, "--out", out, "--no-report")
    assert code == 0 and "8/8 runs done" in stdout, stdout + stderr
    assert len(calls) == 8 and set(calls.values()) == {1}
    before = {r["run_id"]: (r["started_at"], r["attempts"]) for r in runs_in(out)}
    code, stdout, stderr = cli(capsys, "study", spec_file, "--out", out, "--no-report")
    assert code == 0 and "8/8 runs done" in stdout, stdout + stderr
    assert sum(calls.values()) == 8, "nothing ran again"
    assert {r["run_id"]: (r["started_at"], r["attempts"]) for r in runs_in(out)} == before
    other = write_study(tmp_path, TINY.replace("replicates = 2", "replicates = 3"))
    assert "holds another study" in usage_error(capsys, "study", other, "--out", out, "--no-report")


def runs_in(out) -> list[dict]:
    with sqlite3.connect(out / "study.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM runs")]


def test_an_interrupted_study_runs_the_interrupted_run_again_and_no_finished_one(tmp_path, monkeypatch):
    """The bookkeeping of a study stopped in its third run (Ctrl-C, or a kill: the run stays `running`)."""
    spec, started = parse_spec(TINY, "tiny"), []

    def stop_in_the_third_run(config, attempt):
        started.append(config.name)
        return KeyboardInterrupt("killed") if len(started) == 3 else None

    calls = stub_training(monkeypatch, stop_in_the_third_run)
    runner = StudyRunner(spec, tmp_path / "study")
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.run()
    finally:
        runner.close()
    statuses = {r["run_id"]: r["status"] for r in runs_in(tmp_path / "study")}
    assert sorted(statuses.values()) == ["done", "done"] + ["pending"] * 5 + ["running"]
    runner = StudyRunner(spec, tmp_path / "study")  # run again, as after a restart
    try:
        runs = runner.run()
    finally:
        runner.close()
    assert len(runs) == 8 and all(r["status"] == "done" and r["summary"] for r in runs)
    assert {r["run_id"]: r["attempts"] for r in runs} == {
        run_id: 2 if status == "running" else 1 for run_id, status in statuses.items()}
    assert sorted(calls.values()) == [1] * 7 + [2], "only the interrupted run ran again"


@pytest.mark.slow
def test_a_study_killed_midway_resumes_and_records_every_run_exactly_once(tmp_path):
    """A real study process killed (SIGKILL) in its third run; run again, the killed run resumes its own record."""
    # one thread a run: with one core of two kept busy by other work, a run's two OpenMP threads wait for each
    # other at every operator and a 3-epoch run took 4.6 to 50 s (the whole test 110 s instead of 12)
    slow = TINY.replace("epochs = 1", "epochs = 3\nthreads = 1").replace("synthetic:n=300", "synthetic:n=800")
    spec_file = write_study(tmp_path, slow.replace("replicates = 2", "replicates = 1"))
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "distcnn", "study", str(spec_file), "--out", str(out), "--no-report"]
    study = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # wait until some runs are done and the next one is under way
            if (out / "study.db").exists():
                try:
                    runs = runs_in(out)
                except sqlite3.OperationalError:  # the study process has created the file, not yet its tables
                    runs = []
                statuses = [r["status"] for r in runs]
                # killed after the running run's first epoch: in the middle of a run, with a checkpoint
                if statuses.count("done") >= 2 and any(r["status"] == "running" and r["run_dir"] and (
                        Path(r["run_dir"]) / "epochs.csv").exists() for r in runs):
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the study did not get going")
    finally:
        os.killpg(study.pid, signal.SIGKILL)  # the study, its torchrun agents and their workers
        study.wait()
    interrupted = [r["run_id"] for r in runs_in(out) if r["status"] == "running"]
    assert interrupted, "killed in the middle of a run"
    resumed = run_cli("study", str(spec_file), "--out", str(out), "--no-report", timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    runs = runs_in(out)
    assert len(runs) == 4 and len({r["run_id"] for r in runs}) == 4
    assert all(r["status"] == "done" and r["summary"] for r in runs)
    attempts = {r["run_id"]: r["attempts"] for r in runs}
    assert all(attempts[run_id] == 2 for run_id in interrupted)
    assert sum(attempts.values()) == 4 + len(interrupted), "finished runs were not run again"
    for run in runs:  # each run record holds one finished run, with one row per epoch
        epochs = (out / "runs" / run["run_id"] / "epochs.csv").read_text().splitlines()
        assert len(epochs) == 1 + 3


def test_a_failing_run_is_retried_then_recorded_as_failed_and_the_study_goes_on(tmp_path, monkeypatch):
    spec = parse_spec(TINY, "flaky")

    def flaky(config, attempt):
        if config.policy == "flip-crop" and config.model == "lenet":
            return WorkersFailed(1, "rank 1 failed with exit code 1")
        if config.policy == "none" and config.model == "simplecnn" and attempt == 1:
            return WorkersFailed(1, "rank 0 failed with exit code -9")
        return None

    stub_training(monkeypatch, flaky)
    runner = StudyRunner(spec, tmp_path / "flaky", retries=1)
    try:
        runs = {r["run_id"]: r for r in runner.run()}
    finally:
        runner.close()
    failed = [r for r in runs.values() if r["status"] == "failed"]
    assert all(r["levels"] == {"policy": "flip-crop", "model": "lenet"} for r in failed) and len(failed) == 2
    assert all(r["attempts"] == 2 and "exit code 1" in r["error"] for r in failed)
    done = [r for r in runs.values() if r["status"] == "done"]
    assert len(done) == 6
    retried = [r for r in done if r["levels"] == {"policy": "none", "model": "simplecnn"}]
    assert all(r["attempts"] == 2 for r in retried) and len(retried) == 2
