"""Damaged files and full disks end in one line, and a run resumes from what was saved: a checkpoint cut short
is replaced by the one before it, a study.db that is not a database is named with what to do, and a disk that
fills up while a run writes its record names the file and the space it needed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import TINY_STUDY, cli, read_summary, run_cli, usage_error, write_study

RUN = ("train", "--data", "synthetic:n=400", "--epochs", "2", "--batch-size", "32")


def cut_short(path: Path) -> None:
    """As a copy interrupted half way leaves a file."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch run: its directory and summary (copy it before changing it)."""
    from distcnn.cli import main

    out = tmp_path_factory.mktemp("damaged") / "run"
    assert main([*RUN, "--out", str(out)]) == 0
    return out, read_summary(out)


def crashed_copy(finished, folder: Path) -> Path:
    """The finished run as it would be had it stopped after writing its last checkpoint: no summary yet."""
    out = Path(folder) / "run"
    shutil.copytree(finished[0], out)
    (out / "summary.json").unlink()
    return out


def damaged_two_rank_run(out: Path) -> None:
    """The crashed copy as a 2-rank run whose one checkpoint is no checkpoint at all."""
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    config = (out / "config.json").read_text().replace('"nproc_per_node": 1', '"nproc_per_node": 2')
    (out / "config.json").write_text(config)


def test_each_epoch_checkpoint_keeps_the_one_before_it(finished):
    import torch

    out, _ = finished
    newest = torch.load(out / "checkpoint.pt", weights_only=True)["state"]["epoch"]
    previous = torch.load(out / "checkpoint.prev.pt", weights_only=True)["state"]["epoch"]
    assert (previous, newest) == (1, 2)


def test_a_damaged_checkpoint_resumes_from_the_one_before_it_and_ends_as_the_undamaged_run(finished, tmp_path,
                                                                                          capsys):
    out = crashed_copy(finished, tmp_path)
    cut_short(out / "checkpoint.pt")
    code, stdout, stderr = cli(capsys, *RUN, "--out", str(out), "--resume")
    assert code == 0, stderr
    warning = [line for line in (stdout + stderr).splitlines() if "is damaged" in line]
    assert len(warning) == 1 and "checkpoint.pt is damaged" in warning[0] and "after epoch 1" in warning[0]
    assert "Traceback" not in stderr and (out / "checkpoint.pt.damaged").exists()
    summary = read_summary(out)
    assert summary["resumed_at_epochs"] == [1] and summary["epochs_run"] == 2
    assert summary["test_accuracy"] == finished[1]["test_accuracy"], "the epoch replayed exactly"


def test_a_damaged_checkpoint_with_nothing_before_it_is_one_line_and_changes_nothing(finished, tmp_path, capsys):
    out = crashed_copy(finished, tmp_path)
    cut_short(out / "checkpoint.pt")
    cut_short(out / "checkpoint.prev.pt")
    before = sorted(path.name for path in out.iterdir())
    line = usage_error(capsys, *RUN, "--out", str(out), "--resume")
    assert "checkpoint.pt is damaged" in line and "checkpoint.prev.pt" in line and "delete both" in line
    assert sorted(path.name for path in out.iterdir()) == before
    (out / "checkpoint.prev.pt").unlink()
    line = usage_error(capsys, *RUN, "--out", str(out), "--resume")
    assert "checkpoint.pt is damaged" in line and "delete it to start the run over" in line


@pytest.mark.slow
def test_damaged_best_weights_are_taken_from_the_checkpoint_of_the_best_epoch_or_named_in_one_line(finished,
                                                                                                 tmp_path, capsys):
    import torch

    out = crashed_copy(finished, tmp_path)
    assert finished[1]["best_epoch"] == finished[1]["epochs_run"], "the synthetic run's last epoch is its best"
    cut_short(out / "best.pt")
    code, stdout, stderr = cli(capsys, *RUN, "--out", str(out), "--resume")
    assert code == 0, stderr
    warning = [line for line in (stdout + stderr).splitlines() if "is damaged" in line]
    assert len(warning) == 1 and "best.pt is damaged" in warning[0] and "from checkpoint.pt" in warning[0], warning
    assert read_summary(out)["test_accuracy"] == finished[1]["test_accuracy"], "the same weights scored"

    from distcnn.checkpoint import DamagedFile, read_checkpoint

    for name in ("checkpoint.pt", "checkpoint.prev.pt"):  # no checkpoint of the best epoch beside it
        saved = torch.load(out / name, weights_only=True)
        saved["state"]["best_epoch"] = 0
        torch.save(saved, out / name)
    with pytest.raises(DamagedFile) as refused:
        read_checkpoint(out / "best.pt")
    assert "best.pt is damaged" in str(refused.value) and "put back a good copy" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_damaged_checkpoint_of_a_two_rank_run_is_found_before_any_rank_starts(finished, tmp_path):
    out = crashed_copy(finished, tmp_path)
    (out / "checkpoint.prev.pt").unlink()
    damaged_two_rank_run(out)
    done = run_cli(*RUN, "--nproc-per-node", "2", "--out", str(out), "--resume", timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "checkpoint.pt is damaged" in lines[0], done.stderr


def test_a_study_db_that_is_not_a_database_is_one_line_and_its_runs_survive_it(tmp_path, capsys):
    study_file = write_study(tmp_path, TINY_STUDY.replace("replicates = 2", "replicates = 1")
                             .replace('model = ["lenet", "simplecnn"]\n', ''))
    out = tmp_path / "out"
    assert cli(capsys, "study", str(study_file), "--out", str(out), "--no-report")[0] == 0
    trained = {path: path.stat().st_mtime_ns for path in out.rglob("summary.json")}
    (out / "study.db").write_bytes(b"this is no database" * 100)
    for command in (("study", str(study_file), "--out", str(out), "--no-report"), ("analyze", str(out)),
                    ("report", str(out)), ("export", str(out), "--csv", str(tmp_path / "t.csv"))):
        line = usage_error(capsys, *command)
        assert "study.db is damaged" in line and "move it away" in line, command
    (out / "study.db").rename(out / "study.db.damaged")
    code, stdout, _ = cli(capsys, "study", str(study_file), "--out", str(out), "--no-report")
    assert code == 0 and "2/2 runs done" in stdout
    assert {path: path.stat().st_mtime_ns for path in out.rglob("summary.json")} == trained, "nothing retrained"


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: a run's record (a 1.9 MB checkpoint, its predecessor, best weights) does not fit."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_names_the_file_and_the_space_it_needs_and_the_run_resumes(small_disk, tmp_path, capsys):
    out = small_disk / "run"
    code, _, stderr = cli(capsys, *RUN, "--out", str(out))
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "no space left on the device" in lines[0] and "it needs" in lines[0] and "free" in lines[0]
    assert f"--out {out} --resume" in lines[0] and str(out) in lines[0]
    assert not [path for path in out.iterdir() if path.name.startswith(".") and path.name != ".lock"], \
        "no half-written file left"
    moved = tmp_path / "run"  # space freed: the same record on a larger disk
    shutil.copytree(out, moved)
    code, _, stderr = cli(capsys, *RUN, "--out", str(moved), "--resume")
    assert code == 0, stderr
    assert read_summary(moved)["epochs_run"] == 2 and read_summary(moved)["resumed_at_epochs"] == [1]


def test_a_damaged_epochs_csv_is_one_line_and_a_row_cut_short_is_no_epoch(finished, tmp_path):
    from distcnn.errors import UsageError
    from distcnn.record import RunRecord

    out = crashed_copy(finished, tmp_path)
    record = RunRecord(out)
    assert [row["epoch"] for row in record.read_epochs()] == [1, 2]
    text = (out / "epochs.csv").read_text()
    (out / "epochs.csv").write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])  # epoch 2 cut
    assert [row["epoch"] for row in record.read_epochs()] == [1]
    (out / "epochs.csv").write_bytes(b"epoch,loss\n\xff\xfe\x00garbage")
    with pytest.raises(UsageError, match="epochs.csv is damaged"):
        record.read_epochs()


def test_a_damaged_image_cache_is_decoded_again(tmp_path, monkeypatch):
    from helpers import make_imagefolder

    from distcnn.data import load_data

    monkeypatch.setenv("DISTCNN_CACHE", str(tmp_path / "cache"))
    root = make_imagefolder(tmp_path / "images", classes=2, per_class=6, size=8)
    first = load_data(f"imagefolder:{root}")
    [cached] = list((tmp_path / "cache").rglob("decoded-*.npy"))
    whole = cached.stat().st_size
    cut_short(cached)
    again = load_data(f"imagefolder:{root}")
    assert again.train.images.equal(first.train.images) and again.test.images.equal(first.test.images)
    assert cached.stat().st_size == whole, "written whole again"


@pytest.mark.slow
def test_ranks_started_by_hand_on_a_damaged_checkpoint_end_with_one_line(finished, tmp_path):
    """torchrun started by hand (no launcher to check the file first): rank 0 reads the checkpoint and every
    rank ends with its one line, printed once."""
    import sys

    from helpers import ROOT

    out = crashed_copy(finished, tmp_path)
    (out / "checkpoint.prev.pt").unlink()
    damaged_two_rank_run(out)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                           "-m", "distcnn.worker", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("distcnn: error:")]
    assert done.returncode != 0 and len(lines) == 1 and "checkpoint.pt is damaged" in lines[0], done.stderr
