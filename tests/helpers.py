"""What tests share besides fixtures: the CLI run as a user types it or in this process, studies with a stubbed
trainer or a real one, a run killed mid-epoch, reading reports; and small datasets written to disk (image folders
a tiny CNN can learn, IDX files)."""

from __future__ import annotations

import colorsys
import gzip
import itertools
import json
import os
import shutil
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
# The shared real study (the session fixture `tiny_study`): 2^2 configurations x 2 replicates of one epoch.
TINY_STUDY = """
[base]
data = "synthetic:n=300"
epochs = 1
batch-size = 32
sample-interval = 0.1
[factors]
policy = ["none", "flip-crop"]
model = ["lenet", "simplecnn"]
[study]
replicates = 2
design = "2k"
responses = ["test_accuracy", "cpu_percent_mean", "train_seconds"]
"""
# A real 2-rank gloo run through torchrun, small enough for a test (conftest's two_rank_run; the comm hooks).
TWO_RANKS = ("--data", "synthetic:n=700", "--nproc-per-node", "2", "--epochs", "2", "--batch-size", "32",
             "--sample-interval", "0.1", "--seed", "1")
TWO_HOSTS_RATE = "1gbit"  # the link cap of conftest's two_host_run (a 2-node job on two emulated hosts)
# Whether this machine can build the emulated cluster (distcnn cluster up): root, and iproute2's ip and tc
CAN_BUILD_CLUSTER = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None
STUDY_FILE = "tiny.toml"  # a study's name is its file's: a study run again must be written under the same name


# ---- the command line ---------------------------------------------------------------------------------------

def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m distcnn ARGS` as a user would type it (`env`: variables to add), with output captured."""
    env = dict(os.environ, PYTHONUNBUFFERED="1") | (env or {})
    return subprocess.run([sys.executable, "-m", "distcnn", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`distcnn ARGS` in this process (no interpreter to start): (exit code, stdout, stderr)."""
    from distcnn.cli import main

    capsys.readouterr()  # only what this command prints
    try:
        code = main([str(arg) for arg in args])
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def usage_error(capsys, *args: str) -> str:
    """`distcnn ARGS` in this process, refused as a user mistake: exit code 2 and one line on stderr, no
    traceback. That line."""
    code, _, err = cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("distcnn: error:") and "Traceback" not in err, err
    return lines[0]


# ---- runs and studies ---------------------------------------------------------------------------------------

def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def interrupted_run(monkeypatch, config, epoch: int) -> None:
    """Run `config` and kill it (KeyboardInterrupt) as it starts epoch index `epoch`, after the checkpoints of
    the epochs before; the trainer is whole again afterwards, ready for the run to resume."""
    from distcnn.launch import run
    from distcnn.trainer import Trainer

    original = Trainer._train_epoch

    def crash(self, index):
        if index == epoch:
            raise KeyboardInterrupt("killed")
        return original(self, index)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_train_epoch", crash)
        with pytest.raises(KeyboardInterrupt):
            run(config)


def stub_training(monkeypatch, fail=None) -> Counter:
    """Studies run a stand-in for training: each run writes and returns a summary (figures that differ by
    configuration and seed) in no time. `fail(config, attempt)` may return an exception for that attempt of a
    run to raise instead (attempts count from 1). Returns the calls per run name. For bookkeeping tests only."""
    from distcnn.study import runner

    calls: Counter = Counter()

    def run(config):
        calls[config.name] += 1
        error = fail(config, calls[config.name]) if fail else None
        if error is not None:
            raise error
        spread = zlib.crc32(f"{config.name}/{config.seed}".encode()) % 1000 / 10_000
        summary = {"name": config.name, "seed": config.seed, "epochs_run": config.epochs,
                   "test_accuracy": 0.5 + spread, "cpu_percent_mean": 90 + 10 * spread, "train_seconds": 1 + spread}
        Path(config.out).mkdir(parents=True, exist_ok=True)
        (Path(config.out) / "summary.json").write_text(json.dumps(summary))
        return summary

    # The runner calls the launcher through its module; it lives in distcnn.launch (earlier: distcnn.train).
    monkeypatch.setattr(runner.launch if hasattr(runner, "launch") else runner.train, "run", run)
    return calls


def write_study(folder: Path, text: str = TINY_STUDY) -> Path:
    """The study file `text` in `folder`, under the one name every test gives it."""
    path = Path(folder) / STUDY_FILE
    path.write_text(text)
    return path


def run_study(folder: Path, text: str = TINY_STUDY) -> Path:
    """Write a study file into `folder` and run it through the CLI (in this process: its runs have one rank),
    for real, without its report; the study directory."""
    from distcnn.cli import main

    out = Path(folder) / "out"
    assert main(["study", str(write_study(folder, text)), "--out", str(out), "--no-report"]) == 0
    return out


def copy_study(study_dir: Path, folder: Path) -> Path:
    """A copy of a study directory (without its report) that a test may change: shared studies stay as run."""
    copy = Path(folder) / "study"
    shutil.copytree(study_dir, copy, ignore=shutil.ignore_patterns("report*"))
    return copy


def written_report(study_dir: Path) -> tuple[str, str]:
    """Write a study's report; (its HTML, its Markdown)."""
    from distcnn.study.report import write_report

    html_path, md_path = write_report(study_dir)
    return html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")


def markdown_table(markdown: str, heading: str) -> list[list[str]]:
    """The first table after `heading`, as rows of cells without escapes (header first, --- line left out)."""
    lines = markdown.split(heading, 1)[1].splitlines()
    first = next(index for index, line in enumerate(lines) if line.startswith("|"))
    table = itertools.takewhile(lambda line: line.startswith("|"), lines[first:])
    return [[cell.strip().replace("\\", "") for cell in line.strip("|").split(" | ")]
            for line in table if not line.startswith("| ---")]


# ---- datasets on disk ---------------------------------------------------------------------------------------

IDX_TYPE_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
                  np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
HELPER_MODES = ("RGB", "RGBA", "L", "LA", "I;16")


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file, gzipped when the name ends in .gz (the inverse of read_idx)."""
    big_endian = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    code = IDX_TYPE_CODES[big_endian.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(big_endian).tobytes()
    path.write_bytes(gzip.compress(payload, compresslevel=1) if path.suffix == ".gz" else payload)
    return path


def class_image(rng: np.random.Generator, label: int, classes: int, size: int) -> np.ndarray:
    """(size, size, 3) float RGB in [0, 255]: a square of the class's colour at the class's place in a 3x3
    grid, jittered, on a grey background, all under pixel noise. Colour alone or place alone identifies the
    class (place still does in grayscale), so a tiny CNN learns it in a few steps; noise keeps it from being
    a lookup."""
    colour = np.array(colorsys.hsv_to_rgb(label / classes, 0.9, 0.95)) * 255
    side = max(2, size // 3)
    cell_row, cell_col = divmod(label % 9, 3)
    jitter = max(1, size // 16)
    top = int(np.clip(cell_row * (size - side) / 2 + rng.integers(-jitter, jitter + 1), 0, size - side))
    left = int(np.clip(cell_col * (size - side) / 2 + rng.integers(-jitter, jitter + 1), 0, size - side))
    image = np.full((size, size, 3), 110.0)
    image[top : top + side, left : left + side] = colour
    return np.clip(image + rng.normal(0, 20, image.shape), 0, 255)


def to_mode(rgb: np.ndarray, mode: str) -> Image.Image:
    """A PIL image of the given mode from float RGB in [0, 255]."""
    rgb8 = np.rint(rgb).astype(np.uint8)
    grey = np.rint(rgb @ np.array([0.299, 0.587, 0.114]))
    alpha = np.full(rgb.shape[:2], 200, dtype=np.uint8)
    if mode == "RGB":
        return Image.fromarray(rgb8, "RGB")
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb8, alpha]), "RGBA")
    if mode == "L":
        return Image.fromarray(grey.astype(np.uint8), "L")
    if mode == "LA":
        return Image.fromarray(np.dstack([grey.astype(np.uint8), alpha]), "LA")
    if mode == "I;16":
        return Image.fromarray((grey * 257).astype(np.uint16))  # 16-bit grey: mode I;16
    raise ValueError(f"mode {mode!r} not supported by make_imagefolder; use one of {HELPER_MODES}")


def write_classes(folder: Path, classes: int, per_class: int, size: int, mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for label in range(classes):
        class_dir = folder / f"class{label}"
        class_dir.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            to_mode(class_image(rng, label, classes, size), mode).save(class_dir / f"img{k:04d}.png")


def make_imagefolder(
    root: Path, classes: int = 3, per_class: int = 40, size: int = 32, mode: str = "RGB", splits: bool = False
) -> Path:
    """Write a learnable image folder of PNGs under ``root`` and return ``root``.

    Classes are ``class0``, ``class1``, ... With ``splits`` the folder has ``train/`` (``per_class`` images per
    class), ``val/`` and ``test/`` (``max(2, per_class // 4)`` each); otherwise the class folders sit directly
    in ``root``. Deterministic: the same arguments write the same pixels.
    """
    root = Path(root)
    if splits:
        held_out = max(2, per_class // 4)
        write_classes(root / "train", classes, per_class, size, mode, seed=1)
        write_classes(root / "val", classes, held_out, size, mode, seed=2)
        write_classes(root / "test", classes, held_out, size, mode, seed=3)
    else:
        write_classes(root, classes, per_class, size, mode, seed=0)
    return root
