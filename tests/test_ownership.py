"""Nothing lost, nobody in: one process per run or study directory (an OS lock that dies with its holder), runs
claimed atomically in study.db, ranks that die with their launcher, and file-system conditions as one line."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, cli, read_summary, run_cli, usage_error, write_study

from distcnn.ownership import PARENT_ENV, DirectoryLock, lock_name
from distcnn.record import read_rows
from distcnn.study.store import StudyStore

TINY = ("--data", "synthetic:n=200", "--epochs", "1", "--batch-size", "32", "--telemetry", "off")
HOLD = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); " \
       "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'{\"pid\": %d, \"host\": \"h\", \"since\": \"now\"}' " \
       "% os.getpid()); print('held', flush=True); time.sleep(600)"


def hold_lock(directory: Path) -> subprocess.Popen:
    """Another process that holds `directory`'s lock until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(directory / ".lock")], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_directory_is_refused_naming_its_holder_and_a_dead_holder_never_blocks(tmp_path):
    holder = hold_lock(tmp_path)
    with pytest.raises(Exception) as refused:
        DirectoryLock(tmp_path, "run").acquire()
    assert f"in use by pid {holder.pid} on host h" in str(refused.value)
    holder.kill()
    holder.wait()
    lock = DirectoryLock(tmp_path, "run").acquire()  # the kernel released the dead holder's lock
    assert f'"pid": {os.getpid()}' in (tmp_path / ".lock").read_text()
    lock.release()


def test_training_in_a_run_another_process_holds_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = hold_lock(out)
    try:
        for extra in ((), ("--resume",)):
            line = usage_error(capsys, "train", *TINY, "--out", out, *extra)
            assert f"run directory {out} is in use by pid {holder.pid}" in line
        assert sorted(p.name for p in out.iterdir()) == [".lock"], "nothing written into the held run"
    finally:
        holder.kill()
        holder.wait()
    code, _, err = cli(capsys, "train", *TINY, "--out", out)
    assert code == 0, err
    assert read_summary(out)["epochs_run"] == 1


def test_a_second_study_on_a_held_study_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "study"
    out.mkdir()
    holder = hold_lock(out)
    try:
        line = usage_error(capsys, "study", write_study(tmp_path), "--out", out, "--no-report")
        assert f"study directory {out} is in use by pid {holder.pid}" in line
        assert not (out / "study.db").exists()
    finally:
        holder.kill()
        holder.wait()


def test_claiming_a_run_is_atomic_across_processes(tmp_path):
    planned = [{"run_id": "c00-r1", "config_index": 0, "replicate": 1, "seed": 0, "run_order": 0, "levels": {}}]
    first, second = StudyStore(tmp_path / "study.db"), StudyStore(tmp_path / "study.db")
    first.begin({"factors": {}}, planned)
    assert first.claim("c00-r1", tmp_path / "a", "host:1")
    assert not second.claim("c00-r1", tmp_path / "a", "host:2"), "a run held by a live runner is not taken"
    assert second.runs()[0]["attempts"] == 1
    second.release_claims()  # what the next runner, holding the study's lock, does after the first died
    assert second.claim("c00-r1", tmp_path / "a", "host:2")
    first.finish("c00-r1", {"test_accuracy": 0.5}, 1.0)
    assert not first.claim("c00-r1", tmp_path / "a", "host:1"), "a done run is never claimed again"
    assert [run["status"] for run in second.runs()] == ["done"]
    first.close(), second.close()


def test_each_machine_of_a_multi_node_job_locks_its_own_part_of_a_shared_run_directory():
    assert lock_name(1, "none", None) == lock_name(2, "emulated", None) == ".lock"
    assert lock_name(2, "none", 0) != lock_name(2, "none", 1)


def test_a_run_directory_that_cannot_be_created_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file, not a directory" in usage_error(capsys, "train", *TINY, "--out", a_file)
    assert "a part of the path is a file" in usage_error(capsys, "train", *TINY, "--out", a_file / "run")
    assert "cannot create the run directory" in usage_error(capsys, "train", *TINY, "--out", "/proc/distcnn/run")
    assert "cannot create the study directory" in usage_error(
        capsys, "study", write_study(tmp_path), "--out", a_file / "study")


@pytest.mark.parametrize("code, reason", [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied")])
def test_a_run_directory_that_cannot_be_written_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch,
                                                                                 code, reason):
    """A read-only mount or a folder without write permission (simulated: the tests may run as root)."""
    out = tmp_path / "run"
    out.mkdir()
    real_open = os.open

    def refused(path, *args, **kwargs):
        if str(path).startswith(str(out)):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refused)
    line = usage_error(capsys, "train", *TINY, "--out", out)
    assert reason in line and str(out) in line
    assert list(out.iterdir()) == []


def test_a_full_disk_mid_run_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    from distcnn.record import RunRecord

    out = tmp_path / "run"
    original = RunRecord.write_epochs

    def full(self, rows):
        if len(rows) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path("epochs.csv")))
        return original(self, rows)

    with monkeypatch.context() as patch:
        patch.setattr(RunRecord, "write_epochs", full)
        code, _, err = cli(capsys, "train", *TINY[:2], "--epochs", "3", *TINY[4:], "--out", out)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "no space left on the device" in lines[0] and f"--out {out} --resume" in lines[0]
    code, _, err = cli(capsys, "train", "--out", out, "--resume")  # the command the line gave: as started
    assert code == 0, err
    assert read_summary(out)["epochs_run"] == 3


def test_a_rank_whose_launcher_is_already_gone_ends_at_once(tmp_path):
    """The window before PR_SET_PDEATHSIG takes effect: a worker whose parent is not the launcher it was started
    by ends instead of training as an orphan."""
    done = subprocess.run([sys.executable, "-m", "distcnn.worker", str(tmp_path)], cwd=ROOT, timeout=60,
                          env=os.environ | {PARENT_ENV: "1" if os.getpid() != 1 else "2"}, capture_output=True)
    assert done.returncode == 128 + signal.SIGKILL and not done.stderr


# ---- a study killed with its whole process group -------------------------------------------------------------

KILLED_STUDY = """
[base]
data = "synthetic:n=3200"
epochs = 4
batch-size = 32
nproc-per-node = 2
sample-interval = 0.1
[factors]
policy = ["none"]
[study]
responses = ["test_accuracy"]
"""


def distcnn_ranks(folder: Path) -> list[psutil.Process]:
    """Every live rank (torchrun worker) of a run under `folder`, whoever its parent is now."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if "distcnn.worker" in line and str(folder) in line:
            found.append(process)
    return found


def setup_segments(csv_path: Path) -> int:
    rows, _ = read_rows(csv_path)
    phases = [row["phase"] for row in rows]
    return sum(1 for i, phase in enumerate(phases) if phase == "setup" and (i == 0 or phases[i - 1] != "setup"))


@pytest.mark.slow
def test_a_study_killed_with_its_process_group_leaves_no_rank_and_its_rerun_trains_each_run_once(tmp_path):
    study_file, out = write_study(tmp_path, KILLED_STUDY), tmp_path / "study"
    argv = [sys.executable, "-m", "distcnn", "study", str(study_file), "--out", str(out), "--no-report"]
    study = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    while not ((out / ".lock").exists() and (out / ".lock").read_text()) and study.poll() is None:
        time.sleep(0.05)
    assert study.poll() is None, f"the study ended before it could be killed: {study.communicate()[0][-3000:]}"
    second = run_cli("study", str(study_file), "--out", str(out), "--no-report", timeout=60)
    assert second.returncode == 2 and f"in use by pid {study.pid}" in second.stderr, (
        second.stderr, study.poll(), study.communicate()[0][-3000:] if study.poll() is not None else "")
    deadline, killed = time.monotonic() + 240, None
    while time.monotonic() < deadline:  # kill it while a run's two ranks train after its first checkpoint
        ranks = distcnn_ranks(out)
        running = {Path(part) for rank in ranks for part in rank.info["cmdline"] if str(out) in part}
        if len(ranks) == 2 and len(running) == 1:
            run_dir = running.pop()
            epochs = run_dir / "epochs.csv"
            # at least one epoch checkpointed (a loaded machine may have finished two between looks), and
            # epochs left: 4 in all, so that the study cannot end before it is killed
            if epochs.exists() and (done := len(epochs.read_text().splitlines()) - 1) >= 1:
                killed = run_dir.name
                break
        assert study.poll() is None, study.communicate()[0]
        time.sleep(0.05)
    else:
        study.kill()
        raise AssertionError("the study never reached a run's second epoch")
    os.killpg(study.pid, signal.SIGKILL)
    study.wait()
    gone = time.monotonic() + 3  # the kernel kills them at once; orphans would train on for seconds
    while distcnn_ranks(out) and time.monotonic() < gone:
        time.sleep(0.1)
    assert not distcnn_ranks(out), "ranks outlived the study that started them"

    rerun = run_cli("study", str(study_file), "--out", str(out), "--no-report", timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    store = StudyStore(out / "study.db")
    runs = store.runs()
    store.close()
    assert [(run["run_id"], run["status"], run["attempts"]) for run in runs] == [(killed, "done", 2)]
    # resumed from its checkpoint: the epochs it had recorded (or one more, checkpointed just before the kill)
    assert read_summary(runs[0]["run_dir"])["resumed_at_epochs"][0] in (done, done + 1)
    for run in runs:
        for rank in (0, 1):
            series = Path(run["run_dir"]) / "telemetry" / f"rank{rank}.csv"
            assert setup_segments(series) == run["attempts"], f"{series}: one setup per attempt, no stray rank"
