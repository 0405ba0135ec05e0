"""What a run records and prints beyond its scores: the resolved learning rate in config.json, validation loss
and top-5 accuracy in epochs.csv, a run directory prepared for torchrun, and the lines a person reads."""

from __future__ import annotations

import csv
import json
import math

import pytest

from distcnn import ownership, worker
from distcnn.config import make_config
from distcnn.errors import UsageError
from distcnn.launch import config_from, run

TINY = {"data": "synthetic:n=300,test=100", "model": "simplecnn", "epochs": 1, "batch_size": 32, "threads": 2,
        "sample_interval": 0.1}


def tiny(tmp_path, name="run", **options):
    return make_config(TINY | {"out": str(tmp_path / name)} | options)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run asked for time to target and shifted test sets: its directory, summary and printed lines."""
    folder = tmp_path_factory.mktemp("output")
    capture = pytest.MonkeyPatch()  # capsys is per test: read what the run prints through a patched say
    printed: list[str] = []
    from distcnn import console

    capture.setattr(console._console, "print", lambda message, **_: printed.append(message))
    try:
        summary = run(tiny(folder, epochs=2, target_accuracy=0.01, eval_shift="rotation", shift_images=40))
    finally:
        capture.undo()
    return folder / "run", summary, printed


def test_config_json_records_the_resolved_learning_rate_and_weight_decay(tiny_run):
    run_dir, _, _ = tiny_run
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["lr"] == 2e-3 and saved["weight_decay"] == 0.05  # adamw's defaults, as the run used them


def test_a_run_with_a_resolved_config_resumes_and_an_old_null_one_too(tmp_path):
    prepared = tiny(tmp_path, prepare_only=True)
    assert run(prepared) is None
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["lr"] == 2e-3 and saved["prepare_only"] is True
    # --resume takes the saved options (a numeric lr against no --lr is no change) but never --prepare-only
    summary = run(config_from({"out": str(tmp_path / "run"), "resume": True}))
    assert summary["epochs_run"] == 1
    old = tmp_path / "old"  # a record from before config.json held the resolved values
    run(tiny(tmp_path, "old", prepare_only=True))
    (old / "config.json").write_text(json.dumps(json.loads((old / "config.json").read_text())
                                                | {"lr": None, "weight_decay": None}))
    assert run(config_from({"out": str(old), "resume": True}))["epochs_run"] == 1
    with pytest.raises(UsageError, match="other options: lr"):
        run(config_from({"out": str(old), "resume": True, "lr": 0.01}))


def test_epochs_csv_has_the_validation_loss_and_top5_accuracy(tiny_run):
    run_dir, _, _ = tiny_run
    with open(run_dir / "epochs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    for row in rows:
        loss, top5, accuracy = float(row["val_loss"]), float(row["val_top5"]), float(row["val_accuracy"])
        assert math.isfinite(loss) and loss > 0
        assert accuracy <= top5 <= 1


def test_few_classes_have_no_top5_column(tmp_path):
    run(tiny(tmp_path, data="synthetic:n=200,test=50,classes=4"))
    with open(tmp_path / "run" / "epochs.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert "val_top5" not in row and float(row["val_loss"]) > 0


def test_the_worker_without_config_json_says_how_to_make_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ownership, "die_with_parent", lambda: None)
    assert worker.main([str(tmp_path / "nothing")]) == 2
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("distcnn: error:") and "config.json is missing" in err[0]
    assert f"distcnn train --prepare-only --out {tmp_path / 'nothing'}" in err[0]


def test_prepare_only_writes_the_config_prints_the_torchrun_command_and_trains_nothing(tmp_path, capsys,
                                                                                         monkeypatch):
    capsys.readouterr()
    assert run(tiny(tmp_path, prepare_only=True, nproc_per_node=2)) is None
    out = lines(capsys.readouterr().out)
    assert len(out) == 1 and "torchrun" in out[0] and "--nproc-per-node=2" in out[0]
    assert out[0].endswith(f"--module distcnn.worker {tmp_path / 'run'}")
    assert sorted(path.name for path in (tmp_path / "run").iterdir() if not path.name.startswith(".")) == [
        "config.json"]
    # what torchrun would start on each rank trains it (here: one rank, in this process)
    monkeypatch.setattr(ownership, "die_with_parent", lambda: None)
    single = json.loads((tmp_path / "run" / "config.json").read_text()) | {"nproc_per_node": 1}
    (tmp_path / "run" / "config.json").write_text(json.dumps(single))
    assert worker.main([str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "summary.json").exists()


def test_the_run_says_what_it_loaded_and_when_it_evaluates(tiny_run):
    _, _, printed = tiny_run
    assert printed[0] == "synthetic: 270 train / 30 val / 100 test images, simplecnn, 1 rank on cpu"
    evaluating = [line for line in printed if line.startswith("evaluating")]
    assert len(evaluating) == 1 and "100 test images" in evaluating[0]


def test_the_last_line_says_whether_the_target_was_reached_and_the_shift_accuracy(tiny_run):
    run_dir, summary, printed = tiny_run
    last = printed[-1]
    assert last.startswith(f"test accuracy {summary['test_accuracy']:.4f} after 2 epochs")
    assert f"target 0.01 reached at epoch 1 ({summary['time_to_target_seconds']:.1f} s)" in last
    assert f"mean shift accuracy {summary['shift_accuracy_mean']:.4f}" in last
    assert last.endswith(f"run record: {run_dir}")


def test_an_independent_cnn_dnn_ends_with_its_table_and_last_line(tmp_path, capsys):
    capsys.readouterr()
    summary = run(tiny(tmp_path, strategy="dd", grid="2x2"))
    out = lines(capsys.readouterr().out)
    assert out[0] == ("synthetic: 270 train / 30 val / 100 test images, simplecnn CNN-DNN 2x2: 4 local CNNs, "
                      "1 rank on cpu")
    table = out[out.index(next(line for line in out if line.startswith("test accuracy  "))):]
    local = summary["local_test_accuracy"]
    assert table[1].split() == ["local", "CNNs", "(4)", f"{sum(local) / 4:.4f}", f"{min(local):.4f}",
                                f"{max(local):.4f}"]
    assert [row.split() for row in table[2:5]] == [
        [name, f"{summary['aggregators'][name]['test_accuracy']:.4f}"] for name in ("dnn", "mean", "vote")]
    assert table[5] == (f"test accuracy (dnn) {summary['test_accuracy']:.4f} after 1 epochs "
                        f"({summary['train_seconds']:.1f} s training) — run record: {tmp_path / 'run'}")
