"""Time to accuracy: on a run whose validation curve is scripted (the test stubs Trainer.scores, the product
evaluates for real), the target is recorded at the first epoch that reaches it, with the wall time and images up
to that epoch; null when never met; --stop-at-target ends the run there; a resumed run keeps it."""

from __future__ import annotations

import csv

import pytest

from distcnn.config import make_config
from distcnn.launch import run
from distcnn.trainer import Trainer
from helpers import interrupted_run

EPOCHS = 5


def config(tmp_path, **options):
    base = {"data": "synthetic:n=200", "model": "simplecnn", "epochs": EPOCHS, "batch_size": 32, "threads": 1,
            "telemetry": "off", "out": str(tmp_path / "run")}
    return make_config(base | options)


@pytest.fixture
def scripted(monkeypatch):
    """Validation accuracies from a list, epoch by epoch; the test set is still scored for real."""
    def install(curve):
        real = Trainer.scores
        values = iter(curve)

        def scores(self, images, shift=None):
            if images is self.splits.val:
                return {"accuracy": next(values), "top5": None, "loss": None}
            return real(self, images, shift)

        monkeypatch.setattr(Trainer, "scores", scores)

    return install


def epochs_csv(run_dir) -> list[dict]:
    with open(run_dir / "epochs.csv") as handle:
        return list(csv.DictReader(handle))


def test_target_is_recorded_at_the_first_epoch_that_reaches_it(tmp_path, scripted):
    scripted([0.30, 0.60, 0.82, 0.79, 0.90])
    summary = run(config(tmp_path, target_accuracy=0.8))
    rows = epochs_csv(tmp_path / "run")
    assert summary["target_accuracy"] == 0.8
    assert summary["epochs_to_target"] == 3
    assert summary["images_to_target"] == summary["images_seen"] * 3 // EPOCHS  # every epoch sees the same count
    assert summary["time_to_target_seconds"] == pytest.approx(sum(float(r["epoch_seconds"]) for r in rows[:3]))
    assert 0 < summary["time_to_target_seconds"] < sum(float(r["epoch_seconds"]) for r in rows)
    assert summary["epochs_run"] == EPOCHS and summary["stopped_at_target"] is False
    assert summary["best_val_accuracy"] == 0.90


def test_target_never_met_is_null_not_zero(tmp_path, scripted):
    scripted([0.30, 0.50, 0.70, 0.79, 0.75])
    summary = run(config(tmp_path, target_accuracy=0.8, stop_at_target=True))
    assert summary["time_to_target_seconds"] is None
    assert summary["epochs_to_target"] is None and summary["images_to_target"] is None
    assert summary["epochs_run"] == EPOCHS and summary["stopped_at_target"] is False


def test_stop_at_target_ends_training_at_that_epoch(tmp_path, scripted):
    scripted([0.30, 0.85, 0.20, 0.20, 0.20])
    summary = run(config(tmp_path, target_accuracy=0.8, stop_at_target=True))
    assert summary["epochs_to_target"] == 2 and summary["epochs_run"] == 2
    assert summary["stopped_at_target"] is True and summary["stopped_early"] is True
    assert len(epochs_csv(tmp_path / "run")) == 2


def test_without_a_target_the_fields_are_null(tmp_path, scripted):
    scripted([0.9] * EPOCHS)
    summary = run(config(tmp_path, epochs=2))
    assert summary["target_accuracy"] is None and summary["epochs_to_target"] is None
    assert summary["time_to_target_seconds"] is None and summary["stopped_at_target"] is False


def test_a_resumed_run_keeps_its_time_to_target(tmp_path, scripted, monkeypatch):
    scripted([0.30, 0.85, 0.90, 0.90, 0.90])
    interrupted_run(monkeypatch, config(tmp_path, target_accuracy=0.8), epoch=3)  # in the fourth epoch
    scripted([0.95, 0.95])  # the resumed epochs 4 and 5: above the target, which was already met at 2
    summary = run(config(tmp_path, target_accuracy=0.8, resume=True))
    rows = epochs_csv(tmp_path / "run")
    assert summary["resumed_at_epochs"] == [3]
    assert summary["epochs_to_target"] == 2
    assert summary["time_to_target_seconds"] == pytest.approx(sum(float(r["epoch_seconds"]) for r in rows[:2]))
