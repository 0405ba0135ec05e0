"""The script torchrun starts on every rank: `python -m distcnn.worker RUN_DIR`.

It trains the run whose config.json the launcher wrote into RUN_DIR. A user mistake found only here
(an image that cannot be decoded, say) ends the rank with one line and exit code 2, as in the CLI.
"""

from __future__ import annotations

import sys
from pathlib import Path

from distcnn import ownership
from distcnn.config import TrainConfig
from distcnn.errors import TrainingDiverged, UsageError
from distcnn.launch import train
from distcnn.record import RunRecord


def main(argv: list[str]) -> int:
    ownership.die_with_parent()  # torchrun starts ranks in sessions of their own: they must not outlive it
    run_dir = Path(argv[0])
    config = TrainConfig(**RunRecord(run_dir).read_config())
    try:
        train(config, run_dir)
    except UsageError as error:
        print(f"distcnn: error: {error}", file=sys.stderr)
        return UsageError.exit_code
    except TrainingDiverged:  # recorded in the summary, which the launcher reads and reports once
        return 0
    except OSError as error:  # a full disk, a folder made read-only: the run resumes from its last checkpoint
        print(f"distcnn: error: {ownership.filesystem_problem(error, 'a rank stopped on a file-system error at')}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
