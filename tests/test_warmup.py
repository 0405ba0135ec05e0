"""A run's one-time warm-up (warmup_seconds) and steady step (step_seconds_steady), and gradients.json: when
each gradient was ready in one timed backward pass. The arithmetic on hand-made epochs' rows; real runs with a
first step made slow on purpose, with too few steps, on two ranks, and without telemetry."""

from __future__ import annotations

import csv
import time

import pytest

from distcnn.config import make_config
from distcnn.launch import run
from distcnn.models import create_model
from distcnn.record import RunRecord
from distcnn.telemetry.gradients import GradientReadiness
from distcnn.telemetry.steps import epoch_medians, warm_up
from distcnn.trainer import Trainer

SLOW_FIRST_STEP = 0.3  # seconds added to a run's first step


def row(epoch, steps, mean, median, steady=None):
    return {"epoch": epoch, "steps": steps, "step_mean_s": mean, "step_median_s": median,
            "step_median_steady_s": steady}


def test_warm_up_is_the_first_epochs_time_above_the_later_epochs_median_step():
    history = [row(1, 10, 0.3, 0.12, 0.11), row(2, 10, 0.1, 0.10), row(3, 10, 0.2, 0.14), row(4, 10, 0.1, 0.11)]
    figures = warm_up(history)
    assert figures["step_seconds_steady"] == pytest.approx(0.11)  # the median of the later epochs' medians
    assert figures["warmup_seconds"] == pytest.approx(10 * (0.3 - 0.11))


def test_one_epoch_counts_its_steady_state_from_its_4th_step():
    assert warm_up([row(1, 8, 0.25, 0.1, 0.05)]) == pytest.approx(
        {"warmup_seconds": 8 * (0.25 - 0.05), "step_seconds_steady": 0.05})


def test_a_first_epoch_faster_than_the_rest_keeps_its_negative_warm_up():
    assert warm_up([row(1, 10, 0.09, 0.09, 0.09), row(2, 10, 0.1, 0.1)])["warmup_seconds"] == pytest.approx(-0.1)


@pytest.mark.parametrize("history", [
    [],  # nothing trained
    [row(1, 3, 0.5, 0.1, None), row(2, 3, 0.1, 0.1)],  # fewer than 4 steps in the first epoch
    [{"epoch": 1, "steps": None}, {"epoch": 2}],  # telemetry off: no step figures
    [{"epoch": 1, "steps": 10, "step_mean_s": 0.2}],  # a row from before these figures (a resumed old run)
])
def test_warm_up_is_none_when_it_cannot_be_measured(history):
    assert warm_up(history) == {"warmup_seconds": None, "step_seconds_steady": None}


def test_epoch_medians_pool_the_ranks_and_leave_out_each_ranks_first_three_steps():
    def steps(*seconds):
        return [{"forward": s / 2, "backward": s / 2} for s in seconds]

    medians = epoch_medians([steps(9.0, 1.0, 1.0, 2.0, 4.0), steps(8.0, 1.0, 1.0, 3.0, 5.0)])
    assert medians["step_median_s"] == pytest.approx(2.5)  # of all ten steps
    assert medians["step_median_steady_s"] == pytest.approx(3.5)  # of 2, 4, 3, 5
    assert epoch_medians([steps(1.0, 1.0, 1.0)])["step_median_steady_s"] is None
    assert epoch_medians([[]]) == {"step_median_s": None, "step_median_steady_s": None}


def epochs(run_dir) -> list[dict]:
    with open(run_dir / "epochs.csv") as handle:
        return [{key: float(value) if value else None for key, value in r.items()} for r in csv.DictReader(handle)]


def check_gradients(run_dir, summary: dict, model: str, world_size: int, bucket_cap_mb=None) -> dict:
    """gradients.json: one row per trainable parameter, its bytes those of the run's gradients, ready times in
    order within the timed backward pass."""
    gradients = RunRecord(run_dir).read_gradients()
    assert gradients["world_size"] == world_size and gradients["bucket_cap_mb"] == bucket_cap_mb
    rows = gradients["parameters"]
    trainable = [name for name, p in create_model(model, in_chans=1, num_classes=10).named_parameters()
                 if p.requires_grad]
    assert sorted(r["name"] for r in rows) == sorted(trainable)
    assert sum(r["bytes"] for r in rows) == summary["gradient_bytes"]
    assert all(r["dtype"] == "float32" and r["bytes"] == 4 * _numel(r["shape"]) for r in rows)
    ready = [r["ready_s"] for r in rows]
    assert None not in ready and ready == sorted(ready)
    assert 0 < ready[0] and ready[-1] <= gradients["backward_seconds"] < 5
    return gradients


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def spied_run(tmp_path, slow: float = 0.0, **options) -> tuple[dict, list[int]]:
    """A real one-rank run in this process, its first step `slow` seconds longer; (summary, the steps (counted
    from 1 over the run) whose backward pass was timed for gradients.json). One thread: steps that another
    process's load slows down stay within a few times their time (several threads wait on each other)."""
    config = make_config({"data": "synthetic:n=600", "model": "lenet", "batch_size": 32, "threads": 1,
                          "sample_interval": 0.1, "out": str(tmp_path / "run")} | options)
    started, timed = [0], []
    step_begin, arm = Trainer.step_begin, GradientReadiness.arm

    def counted_step_begin(self):
        started[0] += 1
        if started[0] == 1:
            time.sleep(slow)
        step_begin(self)

    def spied_arm(self):
        timed.append(started[0])
        arm(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "step_begin", counted_step_begin)
        patch.setattr(GradientReadiness, "arm", spied_arm)
        return run(config), timed


def test_a_slow_first_step_is_the_runs_warm_up(tmp_path):
    """One epoch, so that its steady state is measured under the same load as its slow first step."""
    summary, timed = spied_run(tmp_path, slow=SLOW_FIRST_STEP, epochs=1)
    (first,) = epochs(tmp_path / "run")
    steady, warmup = summary["step_seconds_steady"], summary["warmup_seconds"]
    assert steady == pytest.approx(first["step_median_steady_s"]), "no later epoch: its median from step 4"
    assert warmup == pytest.approx(first["steps"] * (first["step_mean_s"] - steady))
    assert 0 < steady < first["step_mean_s"] and first["steps"] >= 10
    noise = 0.1 + first["steps"] * steady  # the other steps' own warm-up and spread: at most about an epoch
    assert SLOW_FIRST_STEP - noise / 2 < warmup < SLOW_FIRST_STEP + noise
    assert timed == [3], "the 3rd step's backward pass, after DDP would have rebuilt its buckets; once"
    check_gradients(tmp_path / "run", summary, "lenet", world_size=1)


def test_an_epoch_of_two_steps_times_its_last_and_has_no_warm_up_figure(tmp_path):
    summary, timed = spied_run(tmp_path, epochs=1, train_subset=64)
    assert epochs(tmp_path / "run")[0]["steps"] == 2
    assert summary["warmup_seconds"] is None and summary["step_seconds_steady"] is None
    assert timed == [2]
    check_gradients(tmp_path / "run", summary, "lenet", world_size=1)


@pytest.mark.slow
def test_a_two_rank_run_records_its_warm_up_and_rank_0s_gradients(two_rank_run):
    out, summary = two_rank_run
    steady, warmup = summary["step_seconds_steady"], summary["warmup_seconds"]
    first, second = epochs(out)
    assert steady == pytest.approx(second["step_median_s"]), "one later epoch: its median step"
    assert warmup == pytest.approx(first["steps"] * (first["step_mean_s"] - steady))
    assert isinstance(warmup, float) and warmup >= -0.5 * first["steps"] * steady, (
        "kept as measured: noise may take it below 0, not by half an epoch")
    assert 0 < steady < summary["train_seconds"]
    check_gradients(out, summary, "simplecnn", world_size=2)
    assert RunRecord(out / "nowhere").read_gradients() is None
