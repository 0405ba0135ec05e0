"""Shared fixtures: run the CLI the way a user does, in a subprocess, and read run records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m distcnn ARGS` as a user would type it (`env`: variables to add), with output captured."""
    env = dict(os.environ, PYTHONUNBUFFERED="1") | (env or {})
    return subprocess.run([sys.executable, "-m", "distcnn", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_study_text(folder: Path, text: str) -> Path:
    """Write a study file into `folder`, run it through the CLI without its report; the study directory."""
    (folder / "tiny.toml").write_text(text)
    out = folder / "out"
    result = run_cli("study", str(folder / "tiny.toml"), "--out", str(out), "--no-report")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def written_report(study_dir: Path) -> tuple[str, str]:
    """Write a study's report; (its HTML, its Markdown)."""
    from distcnn.study.report import write_report

    html_path, md_path = write_report(study_dir)
    return html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)",
)
