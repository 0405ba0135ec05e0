"""A study through a real two-node Slurm cluster (the `two_node_slurm` fixture: one slurmd in each of two
emulated hosts): a run with nnodes = 2 is one job over both nodes, each host's network counters in its
summary; one node killed mid-run ends the job, the study records it with Slurm's state and retries it, and the
retry resumes the run from its last checkpoint: every epoch trained is recorded once. Skipped, with the
reason, where the machine cannot run the cluster (it needs root)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import write_study
from test_study_slurm import known_runs, start_study, wait_for

from distcnn.record import RunRecord

pytestmark = pytest.mark.slow

EPOCHS = 4
TWO_NODES = f"""
[base]
data = "synthetic:n=2400"
epochs = {EPOCHS}
batch-size = 32
nnodes = 2
sample-interval = 0.2
[factors]
model = ["lenet"]
[study]
design = "full"
responses = ["test_accuracy"]
executor = "slurm"
[slurm]
partition = "debug"
time = 10
cpus_per_task = 1
poll_seconds = 0.5
"""


def epochs_done(run_dir: Path) -> int:
    return len(RunRecord(run_dir).read_epochs())


def test_a_two_node_run_killed_on_one_node_is_recorded_with_slurms_state_and_retried(two_node_slurm, tmp_path):
    slurm = two_node_slurm
    spec_file = write_study(tmp_path, TWO_NODES)
    out = tmp_path / "s"
    study = start_study(spec_file, out, os.environ | slurm.env)
    try:
        first = wait_for(lambda: (runs := known_runs(out)) and runs[0]["job_id"] and runs[0]["run_dir"]
                         and epochs_done(Path(runs[0]["run_dir"])) >= 1 and runs[0], 120,
                         "the first epoch of the two-node job")
        assert slurm.run("squeue", "--noheader", "--format=%D", "--jobs", first["job_id"]).stdout.strip() == "2", \
            "one job over both nodes"
        killed_after = epochs_done(Path(first["run_dir"]))
        assert slurm.kill_node("distcnn-h2"), "the second node had processes to kill"
        retry = wait_for(lambda: (runs := known_runs(out)) and runs[0]["attempts"] == 2
                     and runs[0]["job_id"] not in (None, first["job_id"]) and runs[0], 120,
                         "the study to record the failure and submit the run again")
        slurm.start_node("distcnn-h2")  # the node comes back; the retry waits for it
        output, _ = study.communicate(timeout=180)
    finally:
        if study.poll() is None:
            study.kill()
            study.wait()
    assert study.returncode == 0, output
    failure = next(line for line in output.splitlines() if "failed: Slurm job" in line)
    state, why = failure.split(f"Slurm job {first['job_id']} ", 1)[1].split(": ", 1)
    assert state in ("FAILED", "NODE_FAIL"), failure  # Slurm's own word for how the job ended
    assert "rank" in why or "error" in why.lower(), f"the job's own error, not a pointer to its log: {failure}"
    (run,) = known_runs(out)
    assert run["status"] == "done" and run["attempts"] == 2 and run["job_id"] == retry["job_id"] != first["job_id"]
    assert run["job_state"] == "COMPLETED", "recorded as Slurm says it ended, not as it looked while winding down"
    run_dir = Path(run["run_dir"])
    epochs = [row["epoch"] for row in RunRecord(run_dir).read_epochs()]
    assert epochs == list(range(1, EPOCHS + 1)), "every epoch recorded once"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["resumed_at_epochs"] and \
        1 <= summary["resumed_at_epochs"][0] <= killed_after + 1, summary["resumed_at_epochs"]
    hosts = summary["hosts"]
    assert sorted(hosts) == ["distcnn-h1", "distcnn-h2"] and [hosts[h]["ranks"] for h in sorted(hosts)] == [[0], [1]]
    for host in hosts.values():  # each host's own counters: its namespace's eth0 carried the gradients
        assert host["net_interfaces"] == ["eth0"] and host["net_packets_total"] > 0 and host["net_bytes_total"] > 0
