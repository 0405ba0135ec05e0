"""User mistakes: one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UsageError(Exception):
    """Bad input from the user (a flag, a file, a dataset). The CLI prints it as one line and exits 2.
    `said_by_rank_0`: every rank of a job raises it, and rank 0 prints it (the others end quietly)."""

    exit_code = 2
    said_by_rank_0 = False


def nearest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """' (nearest: a, b)' for a mistyped name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" (nearest: {', '.join(close)})" if close else ""


def unknown(kind: str, name: str, choices: Iterable[str], show_all: bool = True) -> UsageError:
    """The standard 'unknown X' error: what was given, what is allowed, and the nearest match."""
    choices = sorted(choices)
    allowed = f"; allowed: {', '.join(choices)}" if show_all else ""
    return UsageError(f"unknown {kind} {name!r}{allowed}{nearest(name, choices)}")


class RunInterrupted(Exception):
    """The run stopped for a reason outside it (a full disk, a folder made read-only): one line, exit 1, and the
    run continues from its last checkpoint with --resume."""

    exit_code = 1


class CollectiveTimeout(RunInterrupted):
    """A rank waited its whole --collective-timeout in a collective: another rank stopped making progress (it
    hangs, is stopped, or its host is unreachable). The rank that saw it writes the line for the launcher
    (record STALLED) and ends; torchrun then restarts the workers (--max-restarts) or the run ends with it."""


class WorkersFailed(Exception):
    """torchrun's workers failed; `exit_code` is the first failed rank's (2: a user mistake it already printed)."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


class FailedAfterTheRun(WorkersFailed):
    """A rank failed on its way out, after its run had finished: rank 0 writes the summary last, from what every
    rank sent it, so nothing of the run is lost. Said as a warning; the run stands."""


class TrainingDiverged(Exception):
    """The training loss became NaN or infinite. The run stopped at the end of that epoch with its summary.json
    written (`diverged: true`, `diverged_at`): it is finished, so nothing retries it. The CLI prints the one
    line and exits 1; a study records the run as failed with it."""

    exit_code = 1

    @classmethod
    def at(cls, where: dict, lr: float, run_dir) -> "TrainingDiverged":
        """The one line, from a summary's `diverged_at` (epoch and step counted from 1; `local_cnn`: a CNN-DNN's
        local CNN that diverged)."""
        local = f" of local CNN {where['local_cnn']}" if where.get("local_cnn") is not None else ""
        return cls(f"training diverged: the loss{local} was {where['loss']} at epoch {where['epoch']}, step "
                   f"{where['step']} (global step {where['global_step']}); lower --lr (it was {lr:g}) — run "
                   f"record: {run_dir}")
