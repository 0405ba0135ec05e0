"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing left behind."""

from __future__ import annotations

import pytest

from conftest import run_cli
from helpers import make_imagefolder

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
def test_bad_input_is_one_line_and_exit_2(case, tmp_path):
    args, expected = CASES[case]
    out = tmp_path / "run"
    result = run_cli("train", "--epochs", "1", "--data", "synthetic", *args, "--out", str(out), timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert expected in lines[0]
    assert not out.exists(), "a failed start must not leave a run directory behind"


def test_empty_class_folder_and_unreadable_image(tmp_path):
    root = make_imagefolder(tmp_path / "images", classes=3, per_class=5, size=16)
    (root / "empty_class").mkdir()
    result = run_cli("train", "--data", f"imagefolder:{root}", "--out", str(tmp_path / "r1"))
    assert result.returncode == 2 and "empty_class" in result.stderr and "Traceback" not in result.stderr

    (root / "empty_class").rmdir()
    broken = next((root).glob("*/*.png"))
    broken.write_bytes(b"not a png at all")
    result = run_cli("train", "--data", f"imagefolder:{root}", "--out", str(tmp_path / "r2"))
    assert result.returncode == 2 and broken.name in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r2").exists()
