"""A study's runs as Slurm jobs, through submitit: the study process submits each pending run as a job (a job
array where runs share their resources), keeps the job ids in study.db, and records each run when its job ends.
It is the only writer of study.db; the jobs write only their run directories on the shared filesystem.

    [study]
    executor = "slurm"
    [slurm]
    partition = "gpu"            # placeholder: your cluster's partition
    time = "02:00:00"            # per run: minutes, "HH:MM:SS" or "D-HH:MM:SS" (default: 60 minutes)
    gpus_per_node = 4
    cpus_per_task = 32           # one task per node: the torchrun agent and its ranks share these
    account = "my-project"       # placeholder
    setup = ["module load cuda"] # shell lines run before the job's python starts
    sbatch = { exclusive = true, "mail-type" = "END" }   # any other sbatch option, as name = value

A run with nnodes > 1 is one job of that many nodes with one task per node, each starting the torchrun agent;
the rendezvous endpoint is the job's first node (from SLURM_JOB_NODELIST), not typed by the user. Its step
ends as soon as one node's agent fails (srun --kill-on-bad-exit). Jobs are submitted with --no-requeue (unless
[slurm] sbatch names requeue or no-requeue): after a node fails, Slurm would otherwise requeue the job behind
the study's back; the study records the failure with Slurm's state and retries it as --retries says.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from distcnn.config import TrainConfig, make_config
from distcnn.errors import UsageError, nearest

# The options of [slurm] and of their flags; the value's type, for one clear line when it is wrong.
OPTIONS: dict[str, type | tuple] = {
    "partition": str, "time": (int, str), "gpus_per_node": int, "cpus_per_task": int, "mem": str,
    "account": str, "qos": str, "constraint": str, "setup": list, "sbatch": dict, "array_parallelism": int,
    "poll_seconds": (int, float),
}
DEFAULT_MINUTES = 60
DEFAULT_POLL_SECONDS = 2.0  # one sacct call per poll, for all of the study's jobs
# The rendezvous host of a multi-node run until its job knows its first node: the study checks and records the
# run with this placeholder, and the job replaces it (RESUMABLE: a rerun gets another node, and may).
FIRST_NODE = "slurm-first-node"
PORT_BASE, PORT_SPAN = 20000, 20000  # the rendezvous port, from the job id: two jobs on one node do not collide
# Slurm's states for a job that has not ended (submitit's list), and those of one that ended without success.
RUNNING_STATES = ("READY", "PENDING", "RUNNING", "UNKNOWN", "REQUEUED", "COMPLETING", "PREEMPTED", "CONFIGURING",
                  "RESIZING", "SUSPENDED")


def parse_options(table: dict, where: str = "[slurm]") -> dict[str, Any]:
    """[slurm] of a study file (or the flags), checked: names, types, the time limit in minutes."""
    options = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in OPTIONS:
            raise UsageError(f"{where}: unknown option {key!r}{nearest(name, list(OPTIONS))} "
                             f"(allowed: {', '.join(OPTIONS)})")
        kind = OPTIONS[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise UsageError(f"{where} {key}: expected {_kind_name(kind)}, got {value!r}")
        if name == "time":
            value = minutes(value, where)
        elif name in ("gpus_per_node", "cpus_per_task", "array_parallelism", "poll_seconds") and value <= 0:
            raise UsageError(f"{where} {key} must be positive, got {value}")
        elif name == "setup" and not all(isinstance(line, str) for line in value):
            raise UsageError(f"{where} setup: give a list of shell lines, e.g. [\"module load cuda\"]")
        options[name] = value
    return options


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return " or ".join(names[k] for k in kinds)


def minutes(value: int | str, where: str = "[slurm]") -> int:
    """A Slurm time limit as minutes: 90, "90", "01:30:00", "1-00:00:00" (days-hours:minutes:seconds)."""
    if isinstance(value, int):
        total = value
    else:
        match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
        if not match:
            raise UsageError(f"{where} time {value!r}: give minutes or \"HH:MM:SS\" (or \"D-HH:MM:SS\")")
        days, first, second, third = (int(part) if part else None for part in match.groups())
        if second is None and days is None:
            total = first  # "90": minutes, as sbatch reads it
        else:  # HH:MM[:SS] (or D-HH[:MM[:SS]]): seconds round up to a minute
            hours, mins, secs = first, second or 0, third or 0
            total = (days or 0) * 1440 + hours * 60 + mins + (1 if secs else 0)
    if total < 1:
        raise UsageError(f"{where} time must be at least one minute, got {value!r}")
    return total


def with_endpoint(options: dict[str, Any]) -> dict[str, Any]:
    """A run's options as the study checks and records them for Slurm: a multi-node run without an endpoint
    meets at its job's first node (the placeholder the job replaces)."""
    nnodes = options.get("nnodes", 1)
    if isinstance(nnodes, int) and nnodes > 1 and not options.get("rdzv_endpoint") and \
            options.get("cluster", "none") == "none":
        return options | {"rdzv_endpoint": f"{FIRST_NODE}:{PORT_BASE}"}
    return options


def job_parameters(options: dict, config: TrainConfig, name: str) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for one run: its nodes, one task per node (the torchrun agent)."""
    parameters = {
        "job_name": name,
        "nodes": config.nnodes,
        "ntasks_per_node": 1,
        "time": options.get("time", DEFAULT_MINUTES),
        "cpus_per_task": options.get("cpus_per_task", config.nproc_per_node * (config.threads or 1)),
    }
    for key in ("partition", "gpus_per_node", "mem", "account", "qos", "constraint", "setup",
                "array_parallelism"):
        if key in options:
            parameters[key] = options[key]
    sbatch = {k.replace("-", "_"): v for k, v in options.get("sbatch", {}).items()}
    if not {"requeue", "no_requeue"} & set(sbatch):
        sbatch["no_requeue"] = True  # the study retries a failed run itself, as --retries says, and records why
    parameters["additional_parameters"] = sbatch
    if config.nnodes > 1:  # a node whose agent fails ends the job's step, rather than its peers waiting on it
        parameters["srun_args"] = ["--kill-on-bad-exit=1"]
    return parameters


def job_config(config: TrainConfig, environ: dict[str, str] | None = None) -> TrainConfig:
    """Inside the job: a multi-node run's rendezvous at the job's first node, on a port of this job."""
    if not (config.rdzv_endpoint or "").startswith(FIRST_NODE):
        return config
    environ = os.environ if environ is None else environ
    first = _first_node(environ)
    job_id = int(environ.get("SLURM_JOB_ID", "0"))
    return make_config(config.model_dump() | {
        "rdzv_endpoint": f"{first}:{PORT_BASE + job_id % PORT_SPAN}",
        "rdzv_id": f"slurm-{job_id}",
        "node_rank": int(environ.get("SLURM_NODEID", "0")),
    })


def _first_node(environ) -> str:
    """The job's first host, as submitit expands SLURM_JOB_NODELIST ("gpu[03-04]" -> gpu03)."""
    from submitit.slurm.slurm import _parse_node_list

    return _parse_node_list(environ["SLURM_JOB_NODELIST"])[0]


def check_available() -> None:
    """One line, before anything is submitted, when this machine cannot submit to Slurm."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UsageError("--executor slurm needs submitit: pip install submitit") from None
    from shutil import which

    if which("sbatch") is None:
        raise UsageError("--executor slurm: no sbatch on PATH here; run the study on a machine that submits to "
                         "your Slurm cluster (a login node), or use --executor local")


def log_tail(job, lines: int = 3) -> str:
    """The last lines of a job's stderr (stdout when stderr is empty): why it failed, in the study's record."""
    for text in (job.stderr(), job.stdout()):
        kept = [line for line in (text or "").splitlines() if line.strip()]
        if kept:
            return " | ".join(kept[-lines:])
    return "(no log)"


def folder(study_dir: Path) -> Path:
    return Path(study_dir) / "slurm"


def job_named(name: str) -> str | None:
    """The id of the job (an array's own id) Slurm knows by `name`, from the controller (squeue, finished jobs
    included while it keeps them) or else the accounting (sacct); None when neither knows it."""
    import subprocess

    for command in (["squeue", "--states=all", "--noheader", "--name", name, "--format=%F"],
                    ["sacct", "--noheader", "--parsable2", "-X", "--name", name, "--format=JobID"]):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        ids = {line.strip().split("_")[0] for line in done.stdout.splitlines() if line.strip()}
        if done.returncode == 0 and len(ids) == 1:
            return ids.pop()
    return None
