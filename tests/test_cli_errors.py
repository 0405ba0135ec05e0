"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing left behind. Checked in this process
(`distcnn.cli.main`); one test runs the console command itself."""

from __future__ import annotations

import pytest

from helpers import make_imagefolder, run_cli, usage_error

CASES = {
    "unknown model": (["--model", "resnet181"], "resnet18"),
    "unknown policy": (["--policy", "papr"], "paper"),
    "unknown backend": (["--aug-backend", "batchd"], "batched"),
    "no ranks": (["--nproc-per-node", "0"], "nproc_per_node"),
    "unknown flag": (["--polcy", "paper"], "--policy"),
    "bad number": (["--epochs", "two"], "--epochs"),
    "missing folder": (["--data", "imagefolder:/does/not/exist"], "/does/not/exist"),
    "unknown dataset": (["--data", "cifar11"], "fashion-mnist"),
    "missing dataset": (["--data", "fashion-mnist", "--data-dir", "/nonexistent-fmnist"], "apt-get install"),
    "image does not fit the model": (["--model", "vit_tiny_patch16_224", "--image-size", "16"], "does not fit"),
    "unknown shift": (["--eval-shift", "rotation,occlusoin"], "nearest: occlusion"),
    "negative augmentation strength": (["--aug-strength", "-0.5"], "--aug-strength"),
    "stop at target without a target": (["--stop-at-target"], "needs target-accuracy"),
    "target without a validation split": (["--target-accuracy", "0.8", "--val-fraction", "0"],
                                          "needs a validation split"),
    "target above 1": (["--target-accuracy", "80"], "--target-accuracy"),
    "shift images without shifts": (["--shift-images", "100"], "needs eval-shift"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    args, expected = CASES[case]
    out = tmp_path / "run"
    assert expected in usage_error(capsys, "train", "--epochs", "1", "--data", "synthetic", *args, "--out", out)
    assert not out.exists(), "a failed start must not leave a run directory behind"


def test_the_console_command_exits_2_with_one_line(tmp_path):
    """`python -m distcnn` itself: main's exit code becomes the process's, the one line reaches stderr."""
    out = tmp_path / "run"
    result = run_cli("train", "--polcy", "paper", "--out", str(out), timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("distcnn: error:") and "--policy" in lines[0]
    assert not out.exists()


def test_empty_class_folder_and_unreadable_image(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "images", classes=3, per_class=5, size=16)
    (root / "empty_class").mkdir()
    assert "empty_class" in usage_error(capsys, "train", "--data", f"imagefolder:{root}", "--out", tmp_path / "r1")

    (root / "empty_class").rmdir()
    broken = next((root).glob("*/*.png"))
    broken.write_bytes(b"not a png at all")
    assert broken.name in usage_error(capsys, "train", "--data", f"imagefolder:{root}", "--out", tmp_path / "r2")
    assert not (tmp_path / "r2").exists()
