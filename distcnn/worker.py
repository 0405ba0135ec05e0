"""The script torchrun starts on every rank: `python -m distcnn.worker RUN_DIR`.

It trains the run whose config.json the launcher wrote into RUN_DIR. A user mistake found only here
(an image that cannot be decoded, say) ends the rank with one line and exit code 2, as in the CLI.
"""

from __future__ import annotations

import sys
from pathlib import Path

from distcnn.config import TrainConfig
from distcnn.errors import UsageError
from distcnn.record import RunRecord
from distcnn.launch import train


def main(argv: list[str]) -> int:
    run_dir = Path(argv[0])
    config = TrainConfig(**RunRecord(run_dir).read_config())
    try:
        train(config, run_dir)
    except UsageError as error:
        print(f"distcnn: error: {error}", file=sys.stderr)
        return UsageError.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
