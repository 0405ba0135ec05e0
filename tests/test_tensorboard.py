"""`--tensorboard`: the run record also as TensorBoard events, read back as TensorBoard reads them."""

from __future__ import annotations

import csv
import json

import pytest

from distcnn.config import make_config
from distcnn.launch import RESUMABLE_DIFFERENCES, run

OPTIONS = {"data": "synthetic:n=200", "epochs": 2, "batch_size": 32, "threads": 1, "sample_interval": 0.1}


def test_a_run_with_tensorboard_logs_its_epochs_series_and_test_accuracy(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run(make_config(OPTIONS | {"tensorboard": True, "out": str(run_dir)}))
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    with open(run_dir / "epochs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for column in ("train_loss", "val_accuracy"):
        scalars = events.Scalars(f"epoch/{column}")
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([float(row[column]) for row in rows], rel=1e-6)
    tags = events.Tags()["scalars"]
    assert any(tag.startswith("resources/") for tag in tags)
    assert "resources/process_cpu_percent" in tags and "resources/epoch" not in tags
    summary = json.loads((run_dir / "summary.json").read_text())
    [test] = events.Scalars("summary/test_accuracy")
    assert test.value == pytest.approx(summary["test_accuracy"], rel=1e-6)


def test_a_run_without_tensorboard_writes_no_events(tmp_path):
    run_dir = tmp_path / "run"
    run(make_config(OPTIONS | {"epochs": 1, "out": str(run_dir)}))
    assert (run_dir / "summary.json").exists() and not (run_dir / "tensorboard").exists()


def test_tensorboard_is_how_a_run_is_watched_so_a_resume_may_change_it():
    assert "tensorboard" in RESUMABLE_DIFFERENCES
