"""Fault tolerance: a rank killed in the middle of a run is restarted by torchrun (--max-restarts), the run
continues from its last checkpoint, records the restart, and ends as an undisturbed run would."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

from helpers import ROOT, read_summary, run_cli

pytestmark = pytest.mark.slow  # every test here launches several processes

ARGS = ("train", "--data", "synthetic:n=1600", "--epochs", "3", "--batch-size", "32", "--nproc-per-node", "2",
        "--max-restarts", "1", "--seed", "2", "--sample-interval", "0.1")


def workers_of(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True)
            if any("distcnn.worker" in part for part in p.cmdline())]


def test_a_rank_killed_mid_run_restarts_and_ends_as_an_undisturbed_run(tmp_path):
    calm = tmp_path / "calm"
    assert run_cli(*ARGS, "--out", str(calm), timeout=600).returncode == 0
    killed = tmp_path / "killed"
    job = subprocess.Popen([sys.executable, "-m", "distcnn", *ARGS, "--out", str(killed)], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # wait for the first epoch's checkpoint, then kill a rank in epoch 2
        epochs = killed / "epochs.csv"
        if epochs.exists() and len(epochs.read_text().splitlines()) >= 2 and workers_of(job.pid):
            victim = workers_of(job.pid)[-1]
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    else:
        job.kill()
        raise AssertionError("the run never reached its second epoch")
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output
    summary, undisturbed = read_summary(killed), read_summary(calm)
    assert len(summary["restarts"]) == 1 and summary["restarts"][0]["restart"] == 1
    assert summary["restarts"][0]["resumed_after_epoch"] >= 1 and summary["resumed_at_epochs"]
    assert summary["epochs_run"] == 3
    assert summary["test_accuracy"] == undisturbed["test_accuracy"], "exact resume: same weights, same score"
    rows = (killed / "epochs.csv").read_text().splitlines()
    assert len(rows) == 1 + 3, "each epoch recorded once"
