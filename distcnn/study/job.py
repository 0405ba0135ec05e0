"""One run of a study in a process of its own: what a Slurm job's task calls (`run`, through submitit) and what a
study with --parallel N starts for each run on this machine (`python -m distcnn.study.job CONFIG_JSON`).

The run goes through the same launcher as `distcnn train` (validate, lock its directory, resume, train), so a
job started twice for one run is refused by the run's lock instead of training it twice.
"""

from __future__ import annotations

import json
import os
import sys

from distcnn import launch, ownership
from distcnn.config import make_config
from distcnn.errors import RunInterrupted, TrainingDiverged, UsageError, WorkersFailed
from distcnn.study import slurm

# The exit codes of a run's process: the study records a failure with the last line the process wrote.
USAGE, FAILED = 2, 1


def run(config_dict: dict) -> dict | None:
    """The run as `distcnn train` would do it, here; under Slurm a multi-node run first learns its endpoint."""
    return launch.run(slurm.job_config(make_config(config_dict)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m distcnn.study.job CONFIG_JSON (a run's options as JSON; the study runner "
              "starts this)", file=sys.stderr)
        return USAGE
    try:
        run(json.loads(argv[0]))
    except UsageError as error:
        print(f"distcnn: {error}", file=sys.stderr)
        return USAGE
    except (WorkersFailed, TrainingDiverged, RunInterrupted) as error:
        print(f"distcnn: {error}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        return 130
    return 0


def run_in_slot(config_json: str, cpus: list[int], environment: dict[str, str], log: str, study_pid: int) -> None:
    """A --parallel run in its own process (forked from a server that has imported torch already): pinned to
    its cores, its environment set before any GPU is touched, its output in its log, and it dies with the
    study process (its ranks die with it in turn)."""
    os.sched_setaffinity(0, cpus)
    os.environ.update(environment)
    ownership.die_with(study_pid)
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(descriptor, 1), os.dup2(descriptor, 2)
    os.close(descriptor)
    code = main([config_json])
    sys.stdout.flush(), sys.stderr.flush()
    sys.exit(code)


if __name__ == "__main__":
    sys.exit(main())
