"""Where a training step's time goes: data wait, augmentation, forward, backward, optimizer; and how much of
a run's first epoch is one-time warm-up (`warm_up`).

Marks are contiguous — each ends one phase and begins the next — so the phases of an epoch add up to the
epoch's wall time, with nothing uncounted. On a GPU the marks are CUDA events on the current stream, read
once at the end of the epoch: timing follows the device's own timeline and adds no synchronisation to the
steps (a host-side clock would time only the launch of asynchronous kernels).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from distcnn.summary import PHASES


class StepTimer:
    """Times the phases of every step of one epoch on one rank."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps: list[dict[str, float]] = []

    def start(self) -> None:
        """Begin an epoch: the first phase starts now."""
        self.steps, self.current = [], {}
        self.marks: list = []  # CUDA: (phase or None at a step's end, event)
        if self.cuda:
            self.first = self._event()
        else:
            self.last = time.perf_counter()

    def _event(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, phase: str) -> None:
        """End `phase` now (a phase marked twice in one step accumulates)."""
        if self.cuda:
            self.marks.append((phase, self._event()))
            return
        now = time.perf_counter()
        self.current[phase] = self.current.get(phase, 0.0) + now - self.last
        self.last = now

    def end_step(self) -> None:
        if self.cuda:
            self.marks.append((None, None))
        else:
            self.steps.append(self.current)
            self.current = {}

    def finish(self) -> list[dict[str, float]]:
        """Every step's phases in seconds (waits for the device once, at the end of the epoch)."""
        if self.cuda:
            torch.cuda.current_stream().synchronize()
            previous, current = self.first, {}
            for phase, event in self.marks:
                if phase is None:
                    self.steps.append(current)
                    current = {}
                    continue
                current[phase] = current.get(phase, 0.0) + previous.elapsed_time(event) / 1000
                previous = event
            self.marks = []
        return self.steps


def epoch_figures(steps: list[dict[str, float]]) -> dict[str, float | int | None]:
    """Mean and 95th percentile of each phase and of the whole step, over the steps of an epoch (all ranks)."""
    figures: dict[str, float | int | None] = {"steps": len(steps)}
    columns = {phase: [s.get(phase, 0.0) for s in steps] for phase in PHASES}
    columns["step"] = [sum(s.values()) for s in steps]
    for name, values in columns.items():
        figures[f"{name}_mean_s"] = float(np.mean(values)) if values else None
        figures[f"{name}_p95_s"] = float(np.percentile(values, 95)) if values else None
    return figures


def run_breakdown(history: list[dict]) -> dict[str, float] | None:
    """Mean seconds per phase over all steps of a run, from the epochs' rows (weighted by their steps)."""
    rows = [row for row in history if row.get("steps") and row.get("step_mean_s") is not None]
    steps = sum(row["steps"] for row in rows)
    if not steps:
        return None
    return {name: sum(row[f"{name}_mean_s"] * row["steps"] for row in rows) / steps for name in (*PHASES, "step")}


WARM_UP_STEPS = 3  # a first epoch's steps its steady state leaves out when the run has no later epoch
WARM_UP = ("warmup_seconds", "step_seconds_steady")


def epoch_medians(per_rank: list[list[dict[str, float]]]) -> dict[str, float | None]:
    """Median step wall time of an epoch over every rank's steps (step_median_s), and over each rank's steps
    from its 4th on (step_median_steady_s): what `warm_up` reads from the history, kept in the epoch's row so
    that it survives a resume. Medians, not means: the slow first steps barely move them."""
    def median(values: list[float]) -> float | None:
        return float(np.median(values)) if values else None

    return {"step_median_s": median([sum(s.values()) for steps in per_rank for s in steps]),
            "step_median_steady_s": median([sum(s.values()) for steps in per_rank for s in steps[WARM_UP_STEPS:]])}


def warm_up(history: list[dict]) -> dict[str, float | None]:
    """The one-time cost of a run's first epoch (warmup_seconds) and the steady-state step (step_seconds_steady).

    The steady step is the median of the later epochs' medians (their steps are as many each), or without a
    later epoch the first epoch's median from its 4th step on. Warm-up is the first epoch's step time (steps x
    the mean step of all ranks, i.e. the ranks' mean sum) above those steps at the steady step. It is kept as
    measured: a first epoch no slower than the rest gives a figure around 0, slightly negative by noise.
    Both None when the history does not start at epoch 1, or that epoch had fewer than 4 steps, was not timed
    (telemetry off) or was recorded before these figures existed (a resumed older run)."""
    first = history[0] if history else {}
    if first.get("epoch") != 1 or first.get("step_median_steady_s") is None or first.get("step_mean_s") is None:
        return dict.fromkeys(WARM_UP)
    later = [row["step_median_s"] for row in history[1:] if row.get("step_median_s") is not None]
    steady = float(np.median(later)) if later else first["step_median_steady_s"]
    return {"warmup_seconds": first["steps"] * (first["step_mean_s"] - steady), "step_seconds_steady": steady}
