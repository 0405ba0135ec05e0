"""The script torchrun starts on every rank: `python -m distcnn.worker RUN_DIR`.

It trains the run whose config.json the launcher wrote into RUN_DIR (`distcnn train --prepare-only` writes one
for a torchrun started by hand). A user mistake found only here
(an image that cannot be decoded, say) ends the rank with one line and exit code 2, as in the CLI.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pydantic import ValidationError

from distcnn import ownership
from distcnn.config import TrainConfig, describe_validation_error
from distcnn.errors import CollectiveTimeout, TrainingDiverged, UsageError
from distcnn.launch import train
from distcnn.record import CONFIG, RunRecord


def read_run(argv: list[str]) -> tuple[Path, TrainConfig]:
    """The run directory named on the command line and the config the launcher wrote there; UsageError (one
    line saying how to make one) when there is none: the worker is also started by hand, under torchrun."""
    if len(argv) != 1:
        raise UsageError("usage: python -m distcnn.worker RUN_DIR (a run directory that holds config.json)")
    record = RunRecord(argv[0])
    if not record.path(CONFIG).is_file():
        raise UsageError(f"{record.path(CONFIG)} is missing: write it with "
                         f"`distcnn train --prepare-only --out {record.dir} [options]`")
    try:
        return record.dir, TrainConfig(**record.read_config())
    except ValidationError as error:
        raise UsageError(f"{record.path(CONFIG)}: {describe_validation_error(error)}") from None


def main(argv: list[str]) -> int:
    ownership.die_with_parent()  # torchrun starts ranks in sessions of their own: they must not outlive it
    try:
        run_dir, config = read_run(argv)
        train(config, run_dir)
    except UsageError as error:
        if not (error.said_by_rank_0 and os.environ.get("RANK", "0") != "0"):
            print(f"distcnn: error: {error}", file=sys.stderr)
        return UsageError.exit_code
    except TrainingDiverged:  # recorded in the summary, which the launcher reads and reports once
        return 0
    except CollectiveTimeout:  # its line is in the run record (STALLED), which the launcher prints once
        return 1
    except OSError as error:  # a full disk, a folder made read-only: the run resumes from its last checkpoint
        print(f"distcnn: error: {ownership.filesystem_problem(error, 'a rank stopped on a file-system error at')}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
