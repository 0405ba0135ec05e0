"""A loss that becomes NaN or infinite stops the run with one line naming the epoch and the step; the run record
says so (summary.json: `diverged`) and counts as finished, so nothing retries it. Watching for it adds no read
from the device per step. A learning rate that is not a finite number never starts a run."""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import cli, read_summary, run_cli, usage_error, write_study

from distcnn.config import make_config
from distcnn.errors import TrainingDiverged
from distcnn.launch import run

TINY = {"data": "synthetic:n=300", "model": "simplecnn", "epochs": 2, "batch_size": 32, "threads": 1}
HUGE = {"optimizer": "sgd", "lr": 1e30}  # the weights overflow after the first update
MESSAGE = r"training diverged: the loss{} was (nan|inf) at epoch 1, step (\d+) \(global step \2\); lower --lr"


def config(tmp_path, name="run", **options):
    return make_config(TINY | {"out": str(tmp_path / name)} | options)


def test_a_huge_learning_rate_stops_at_the_step_and_the_run_is_finished_as_diverged(tmp_path):
    with pytest.raises(TrainingDiverged) as raised:
        run(config(tmp_path, **HUGE))
    message = str(raised.value)
    match = re.match(MESSAGE.format(""), message)
    assert match and "\n" not in message, message
    assert TrainingDiverged.exit_code == 1
    summary = read_summary(tmp_path / "run")
    at = summary["diverged_at"]
    assert summary["diverged"] is True and at["epoch"] == 1 and at["step"] == int(match.group(2)) >= 2
    assert at["loss"] == match.group(1) and at["global_step"] == at["step"]
    assert summary["epochs_run"] == 1 and summary["stopped_early"] is True, "the second epoch never ran"
    assert summary["test_accuracy"] is None, "weights that diverged are not scored"
    assert not (tmp_path / "run" / "checkpoint.pt").exists(), "nothing to resume from"
    with open(tmp_path / "run" / "epochs.csv") as handle:
        assert [row["train_loss"] for row in csv.DictReader(handle)] == [match.group(1)]
    with pytest.raises(TrainingDiverged, match=re.escape(message)):  # finished: a retry trains nothing
        run(config(tmp_path, resume=True, **HUGE))
    assert read_summary(tmp_path / "run") == summary


def test_a_run_that_learns_is_not_diverged(tmp_path):
    summary = run(config(tmp_path, epochs=1))
    assert summary["diverged"] is False and summary["diverged_at"] is None
    assert summary["test_accuracy"] is not None


def test_watching_the_loss_reads_nothing_from_the_device_per_step(tmp_path, monkeypatch):
    """Each read of a tensor's value waits for the device: the reads a run makes do not grow with its steps."""
    reads: Counter = Counter()
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        def read(self, *args, _name=name, _original=getattr(torch.Tensor, name)):
            reads[_name] += 1
            return _original(self, *args)
        monkeypatch.setattr(torch.Tensor, name, read)
    counts = []
    for batch_size in (64, 16):  # 4 and 16 steps
        reads.clear()
        run(config(tmp_path, name=f"b{batch_size}", epochs=1, optimizer="sgd", batch_size=batch_size))
        counts.append(dict(reads))
    assert counts[0] == counts[1]


def test_a_cnn_dnn_whose_local_cnn_diverges_stops_and_is_finished(tmp_path):
    options = HUGE | {"strategy": "dd", "dd_mode": "independent", "grid": "1x2"}
    with pytest.raises(TrainingDiverged, match=MESSAGE.format(" of local CNN 0")):
        run(config(tmp_path, **options))
    summary, local = read_summary(tmp_path / "run"), read_summary(tmp_path / "run" / "local" / "k00")
    assert summary["diverged"] is True and summary["diverged_at"] == local["diverged_at"] | {"local_cnn": 0}
    assert local["diverged"] is True and summary["test_accuracy"] is None
    other = read_summary(tmp_path / "run" / "local" / "k01")
    assert local["epochs_run"] == other["epochs_run"] == 1, "trained together, the local CNNs stopped together"


@pytest.mark.parametrize("lr", ["inf", "nan", "-inf"])
def test_a_learning_rate_that_is_not_a_finite_number_is_refused(lr, tmp_path, capsys):
    out = tmp_path / "run"
    line = usage_error(capsys, "train", "--data", "synthetic:n=300", "--epochs", "1", "--lr", lr, "--out", out)
    assert "lr" in line and not out.exists()


@pytest.mark.slow
def test_every_rank_stops_together(tmp_path):
    """Two ranks: the loss goes bad on both, the job ends (no rank waits in a collective) with the summary."""
    out = tmp_path / "run"
    result = run_cli("train", "--data", "synthetic:n=700", "--nproc-per-node", "2", "--epochs", "3",
                     "--batch-size", "32", "--optimizer", "sgd", "--lr", "1e30", "--out", str(out), timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and re.match("distcnn: error: " + MESSAGE.format(""), errors[0]), result.stderr
    summary = read_summary(out)
    assert summary["diverged"] is True and summary["epochs_run"] == 1 and summary["world_size"] == 2


def test_a_study_records_a_run_that_diverged_as_failed_and_never_trains_it_again(tmp_path, capsys):
    from distcnn.study.store import StudyStore

    study = write_study(tmp_path, '[base]\ndata = "synthetic:n=300"\nepochs = 1\nbatch-size = 32\noptimizer = "sgd"\n'
                                  '[factors]\nlr = [1e30, 0.01]\n[study]\nresponses = ["test_accuracy"]\n')
    out = tmp_path / "study"
    for _ in range(2):  # the second command finds nothing to do: the run is out of retries
        code, stdout, _ = cli(capsys, "study", study, "--out", out, "--no-report")
        assert code == 1 and "training diverged" in stdout
        store = StudyStore(out / "study.db")
        runs = {run["levels"]["lr"]: run for run in store.runs()}
        store.close()
        assert runs[0.01]["status"] == "done" and runs[0.01]["attempts"] == 1
        assert runs[1e30]["status"] == "failed" and runs[1e30]["attempts"] == 2, "tried, retried once (--retries 1)"
        assert re.match(MESSAGE.format(""), runs[1e30]["error"])
        epochs = (Path(runs[1e30]["run_dir"]) / "epochs.csv").read_text().splitlines()
        assert len(epochs) == 2, "trained once: the retry found the run finished as diverged"
