"""Studies: the study file is checked before anything runs, the design is expanded and randomised, every
configuration × replicate is recorded exactly once — also when the study is killed and run again."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_cli
from distcnn.errors import UsageError, WorkersFailed
from distcnn.study import runner as runner_module
from distcnn.study.runner import StudyRunner, plan_runs
from distcnn.study.spec import load_spec, parse_spec
from distcnn.study.store import load_runs_table

TINY = """
[base]
data = "synthetic:n=300"
epochs = 1
batch-size = 32
sample-interval = 0.1
model = "simplecnn"
[factors]
policy = ["none", "flip-crop"]
width = [0.5, 1.0]
[study]
replicates = 2
design = "2k"
responses = ["test_accuracy", "cpu_percent_mean"]
"""


def write(tmp_path, text: str, name: str = "study.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    (TINY.replace("epochs = 1", "epohcs = 1"), "unknown option 'epohcs' (nearest: epochs"),
    (TINY.replace("policy = [", "polcy = ["), "unknown option 'polcy' (nearest: policy"),
    (TINY.replace('policy = ["none", "flip-crop"]', "policy = []"), "non-empty list of levels"),
    (TINY.replace("[0.5, 1.0]", "[0.5, 1.0, 2.0]"), 'design "2k" needs two levels'),
    (TINY.replace("[0.5, 1.0]", "[0.5, 0.5]"), "a level is listed twice"),
    (TINY.replace('"cpu_percent_mean"]', '"cpu_precent_mean"]'), "unknown response 'cpu_precent_mean' (nearest: cpu_percent_mean"),
    (TINY.replace("[study]", "[studdy]"), "unknown section [studdy]"),
    (TINY.replace("epochs = 1", "epochs = 0"), "--epochs"),
    (TINY.replace("epochs = 1", "seed = 3"), "set [study] seed"),
    (TINY.replace('design = "2k"', 'design = "fractional"'), "not one of full, 2k"),
])
def test_a_bad_study_file_is_one_clear_line(tmp_path, text, message):
    with pytest.raises(UsageError) as error:
        load_spec(write(tmp_path, text))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_input_from_the_command_line_runs_nothing(tmp_path):
    out = tmp_path / "out"
    bad_model = write(tmp_path, TINY.replace('model = "simplecnn"', 'model = "simplecnnn"'))
    result = run_cli("study", str(bad_model), "--out", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("distcnn: error: configuration policy=none width=0.5: unknown model 'simplecnnn'")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (out / "study.db").exists(), "nothing run, nothing recorded"
    missing = run_cli("study", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


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


def test_a_study_runs_once_and_running_it_again_reruns_nothing(tmp_path):
    out = tmp_path / "study"
    first = run_cli("study", str(write(tmp_path, TINY)), "--out", str(out), "--no-report", timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "8/8 runs done" in first.stdout
    rows, order = load_runs_table(out)
    assert len(rows) == 8 and order == {"policy": ["none", "flip-crop"], "width": [0.5, 1.0]}
    accuracies = [row["test_accuracy"] for row in rows]
    assert all(0 <= a <= 1 for a in accuracies) and sum(accuracies) / 8 > 0.25, "the runs trained (chance: 0.1)"
    assert all(row["cpu_percent_mean"] is not None for row in rows)
    before = {r["run_id"]: (r["started_at"], r["attempts"]) for r in runs_in(out)}
    again = run_cli("study", str(write(tmp_path, TINY)), "--out", str(out), "--no-report")
    assert again.returncode == 0 and "8/8 runs done" in again.stdout
    assert {r["run_id"]: (r["started_at"], r["attempts"]) for r in runs_in(out)} == before
    other = run_cli("study", str(write(tmp_path, TINY.replace("replicates = 2", "replicates = 3"))),
                    "--out", str(out), "--no-report")
    assert other.returncode == 2 and "holds another study" in other.stderr


def runs_in(out) -> list[dict]:
    with sqlite3.connect(out / "study.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM runs")]


def test_a_study_killed_midway_resumes_and_records_every_run_exactly_once(tmp_path):
    slow = TINY.replace("epochs = 1", "epochs = 3").replace("synthetic:n=300", "synthetic:n=800")
    spec_file = write(tmp_path, slow)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "distcnn", "study", str(spec_file), "--out", str(out), "--no-report"]
    study = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # wait until some runs are done and the next one is under way
            if (out / "study.db").exists():
                statuses = [r["status"] for r in runs_in(out)]
                if statuses.count("done") >= 2 and "running" in statuses:
                    time.sleep(1.0)
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
    assert len(runs) == 8 and len({r["run_id"] for r in runs}) == 8
    assert all(r["status"] == "done" and r["summary"] for r in runs)
    attempts = {r["run_id"]: r["attempts"] for r in runs}
    assert all(attempts[run_id] == 2 for run_id in interrupted)
    assert sum(attempts.values()) == 8 + len(interrupted), "finished runs were not run again"
    for run in runs:  # each run record holds one finished run, with one row per epoch
        epochs = (out / "runs" / run["run_id"] / "epochs.csv").read_text().splitlines()
        assert len(epochs) == 1 + 3


def test_a_failing_run_is_retried_then_recorded_as_failed_and_the_study_goes_on(tmp_path, monkeypatch):
    spec = parse_spec(TINY, "flaky")
    real_run = runner_module.train.run
    calls = {}

    def flaky_run(config):
        calls[config.name] = calls.get(config.name, 0) + 1
        if config.policy == "flip-crop" and config.width == 0.5:
            raise WorkersFailed(1, "rank 1 failed with exit code 1")
        if config.policy == "none" and config.width == 1.0 and calls[config.name] == 1:
            raise WorkersFailed(1, "rank 0 failed with exit code -9")
        return real_run(config)

    monkeypatch.setattr(runner_module.train, "run", flaky_run)
    runner = StudyRunner(spec, tmp_path / "flaky", retries=1)
    try:
        runs = {r["run_id"]: r for r in runner.run()}
    finally:
        runner.close()
    failed = [r for r in runs.values() if r["status"] == "failed"]
    assert all(r["levels"] == {"policy": "flip-crop", "width": 0.5} for r in failed) and len(failed) == 2
    assert all(r["attempts"] == 2 and "exit code 1" in r["error"] for r in failed)
    done = [r for r in runs.values() if r["status"] == "done"]
    assert len(done) == 6
    retried = [r for r in done if r["levels"] == {"policy": "none", "width": 1.0}]
    assert all(r["attempts"] == 2 for r in retried) and len(retried) == 2
