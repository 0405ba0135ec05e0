"""Profiles from run records: `--from RUN_DIR` (a finished one-rank run instead of a new profile) and the
measured side of `--check RUN_DIR` (a finished multi-rank run against what the model predicts for it).

A run's steady state is its epochs after the first (their mean step and phases, from epochs.csv); a run of one
epoch uses its phases scaled to its steady median step (summary step_seconds_steady), so warm-up is left out
either way. The spread of its steps comes from each epoch's median and 95th percentile. The gradients and
their ready times come from the run's gradients.json (one timed backward pass).
"""

from __future__ import annotations

from pathlib import Path

from distcnn.errors import UsageError
from distcnn.forecast.model import Gradient, Profile
from distcnn.record import RunRecord
from distcnn.summary import PHASES

def finished(run_dir: str | Path, flag: str) -> RunRecord:
    record = RunRecord(run_dir)
    if not record.dir.is_dir():
        raise UsageError(f"{flag} {record.dir}: no such run directory")
    if not record.finished:
        raise UsageError(f"{flag} {record.dir}: not a finished run (no summary.json); finish it with "
                         f"`distcnn train --out {record.dir} --resume`, or give a finished run")
    summary = record.read_summary()
    if summary.get("diverged"):
        raise UsageError(f"{flag} {record.dir}: the run diverged; its steps say nothing about a healthy run")
    return record


def steady_phases(record: RunRecord) -> dict[str, float]:
    """Mean seconds per phase of the run's steady-state steps (every rank pooled)."""
    rows = [row for row in record.read_epochs() if row.get("steps") and row.get("step_mean_s")]
    if not rows:
        raise UsageError(f"{record.dir}: its epochs.csv has no step times (trained with --telemetry off?)")
    later = rows[1:] or rows
    steps = sum(row["steps"] for row in later)
    phases = {phase: sum((row.get(f"{phase}_mean_s") or 0.0) * row["steps"] for row in later)
              / steps for phase in PHASES}
    if len(rows) == 1:
        steady = record.read_summary().get("step_seconds_steady")
        total = sum(phases.values())
        if steady and total:
            phases = {phase: value * steady / total for phase, value in phases.items()}
    return phases


def step_spread(record: RunRecord) -> float:
    """The standard deviation of a run's steady steps, estimated from each epoch's median and 95th percentile
    (epochs.csv keeps those, not every step): (p95 − median) / 1.645, as for normal steps."""
    rows = [row for row in record.read_epochs() if row.get("step_p95_s") and row.get("step_median_s")]
    later = rows[1:] or rows
    spreads = [max(0.0, row["step_p95_s"] - row["step_median_s"]) / 1.645 for row in later]
    return sum(spreads) / len(spreads) if spreads else 0.0


def measured_step(record: RunRecord) -> float:
    return sum(steady_phases(record).values())


def profile_from_run(run_dir: str | Path) -> tuple[Profile, dict]:
    """The Profile of a finished one-rank run, and what it came from."""
    record = finished(run_dir, "--from")
    summary, config = record.read_summary(), record.read_config()
    if summary.get("world_size", 1) != 1:
        raise UsageError(f"--from {record.dir}: a run of {summary['world_size']} ranks, whose steps include "
                         f"their communication; forecast from a one-rank run, or compare this one with "
                         f"--check {record.dir}")
    gradients = record.read_gradients()
    if not gradients or not gradients.get("parameters"):
        raise UsageError(f"--from {record.dir}: the run has no gradients.json (recorded before forecasts, or "
                         "with --telemetry off); leave out --from to profile the configuration instead")
    rows = [row for row in gradients["parameters"] if row.get("ready_s") is not None]
    profile = Profile(
        phases=steady_phases(record),
        gradients=tuple(Gradient.of(row) for row in rows),
        batch_size=config["batch_size"], buffer_bytes=gradients.get("buffer_bytes", 0),
        train_images=summary.get("train_images"),
        eval_seconds=(summary["eval_seconds"] / summary["epochs_run"]) if summary.get("eval_seconds") and
        summary.get("epochs_run") else None, step_stdev_s=step_spread(record))
    meta = {"source": f"run {record.dir}", "model": config["model"], "batch_size": config["batch_size"],
            "bucket_cap_mb": config.get("bucket_cap_mb"), "warmup_seconds": summary.get("warmup_seconds"),
            "hook_compute_measured": False}
    return profile, meta
