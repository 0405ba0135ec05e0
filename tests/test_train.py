"""The training loop on one rank: it learns, it writes its record, it resumes exactly, it stops early."""

from __future__ import annotations

import csv

import pytest
import torch

from distcnn.config import make_config
from distcnn.errors import UsageError
from distcnn.launch import run
from helpers import interrupted_run, make_imagefolder, read_summary

SUMMARY_FIELDS = {"test_accuracy", "best_val_accuracy", "epochs_run", "train_seconds", "images_per_second",
                  "params", "train_flops_per_image"}


def config(tmp_path, **options):
    base = {"data": "synthetic", "model": "simplecnn", "epochs": 3, "batch_size": 64, "threads": 2,
            "out": str(tmp_path / "run")}
    return make_config(base | options)


@pytest.mark.slow
def test_learns_and_writes_the_run_record(tmp_path):
    summary = run(config(tmp_path))
    run_dir = tmp_path / "run"
    assert SUMMARY_FIELDS <= summary.keys()
    assert read_summary(run_dir) == summary
    assert summary["test_accuracy"] > 0.5, "10 classes: chance is 0.1"
    assert summary["epochs_run"] == 3 and summary["params"] > 0 and summary["train_flops_per_image"] > 0
    with open(run_dir / "epochs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert all(float(r["images_per_second"]) > 0 for r in rows)
    for name in ("config.json", "environment.json", "checkpoint.pt", "best.pt"):
        assert (run_dir / name).exists(), name


@pytest.mark.slow
def test_per_sample_backend_with_workers_learns(tmp_path):
    summary = run(config(tmp_path, policy="flip-crop", aug_backend="per-sample", workers=1, epochs=2))
    assert summary["test_accuracy"] > 0.3


def test_imagefolder_of_pngs_trains_well_above_chance(tmp_path):
    root = make_imagefolder(tmp_path / "images", classes=3, per_class=40, size=24)
    summary = run(config(tmp_path, data=f"imagefolder:{root}", epochs=6, batch_size=16, lr=3e-3))
    assert summary["test_accuracy"] > 0.7, "3 classes: chance is 0.33"


@pytest.mark.slow
def test_interrupted_run_resumes_and_ends_exactly_as_an_uninterrupted_one(tmp_path, monkeypatch):
    whole = run(config(tmp_path, out=str(tmp_path / "whole")))

    interrupted_run(monkeypatch, config(tmp_path, out=str(tmp_path / "cut")), epoch=1)  # in the second epoch
    assert not (tmp_path / "cut" / "summary.json").exists()
    with pytest.raises(UsageError, match="--resume"):
        run(config(tmp_path, out=str(tmp_path / "cut")))
    resumed = run(config(tmp_path, out=str(tmp_path / "cut"), resume=True))

    assert resumed["resumed_at_epochs"] == [1]
    assert resumed["epochs_run"] == 3
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_a_finished_run_is_never_rerun(tmp_path):
    first = run(config(tmp_path, epochs=1))
    before = (tmp_path / "run" / "summary.json").stat().st_mtime_ns
    again = run(config(tmp_path, epochs=1, resume=True))
    assert again == first
    assert (tmp_path / "run" / "summary.json").stat().st_mtime_ns == before
    with pytest.raises(UsageError, match="finished run"):
        run(config(tmp_path, epochs=1))


@pytest.mark.slow
def test_early_stopping_stops_when_validation_does_not_improve(tmp_path):
    summary = run(config(tmp_path, epochs=6, patience=1, lr=1e-9, schedule="cosine"))
    assert summary["stopped_early"] is True
    assert summary["epochs_run"] < 6


@pytest.mark.slow
def test_mixup_cutmix_and_label_smoothing_train_with_soft_targets(tmp_path):
    summary = run(config(tmp_path, epochs=2, policy="trivialaugment", mixup=0.2, cutmix=1.0, label_smoothing=0.1))
    assert summary["test_accuracy"] > 0.3


def test_a_run_of_an_own_net_with_batched_augmentation_imports_no_torchvision_timm_or_dynamo():
    """Every rank and launcher starts by importing distcnn: torchvision, timm (each bringing torch._dynamo) and
    kornia are imported only where a run uses them, 2 s of CPU a process spared (a 2-rank run starts three)."""
    import subprocess
    import sys

    probe = ("import sys, distcnn.cli, distcnn.launch, distcnn.worker\n"
             "from distcnn.models import create_model\n"
             "from distcnn.augment import build_augment\n"
             "def loaded():\n"
             "    print(*sorted(m for m in ('torchvision', 'timm', 'torch._dynamo', 'kornia') if m in sys.modules),"
             " sep=',')\n"
             "create_model('lenet', in_chans=1, num_classes=10)\n"
             "build_augment('paper', 'batched', 1, 28)\n"
             "loaded()\n"
             "build_augment('paper', 'per-sample', 1, 28)\n"
             "loaded()\n")
    batched, per_sample = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                         check=True).stdout.splitlines()
    assert batched == "", batched
    assert "torchvision" in per_sample, "the probe sees an import where one happens"
