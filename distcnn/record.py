"""The run record: everything a run leaves, in one directory, each file written atomically.

Layout of a run directory:
    config.json       the resolved TrainConfig
    environment.json  versions, host, cores, threads, world size, device
    epochs.csv        one row per finished epoch (rewritten whole, atomically, after each epoch)
    checkpoint.pt     the latest epoch's training state (for --resume and restarts)
    best.pt           the weights with the best validation accuracy
    cluster.json      on an emulated cluster: its hosts, addresses and link caps
    telemetry/        rank{R}.csv: each rank's resource time series
    gradients.json    telemetry on: when each gradient was ready in one timed backward pass of rank 0, and its
                      bytes (what DDP's buckets are made of); rewritten by each process that trains
    stalled.txt       a rank's collective timed out: which rank stopped making progress (the launcher prints it)
    summary.json      written last, once: its presence means the run finished (its fields: distcnn.summary)

The study runner, the analysis, the report and `distcnn show` read runs only through this module.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distcnn.errors import UsageError

CONFIG = "config.json"
ENVIRONMENT = "environment.json"
EPOCHS = "epochs.csv"
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
SUMMARY = "summary.json"
GRADIENTS = "gradients.json"
STALLED = "stalled.txt"  # the line a rank whose collective timed out leaves for the launcher
TELEMETRY = "telemetry"
TEXT_COLUMNS = {"phase", "host"}  # the series' columns that are not numbers

# Set by a study that runs several runs at once (--parallel): where this run ran and beside which runs.
PLACEMENT_ENV = "DISTCNN_PLACEMENT"


def host_name() -> str:
    """The host a run's files and counters belong to: the emulated host's name, else the machine's."""
    from distcnn.config import HOST_ENV

    return os.environ.get(HOST_ENV) or socket.gethostname()


def write_atomic(path: Path, write: Callable[[Any], None], binary: bool = False) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a run record is meant to be read by others
        os.replace(tmp, path)
    except OSError as error:  # (a full disk, a quota): named by the file it was for, not the temporary one
        Path(tmp).unlink(missing_ok=True)
        if error.filename is None or error.filename == tmp:
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class NoSpace(OSError):
    """A file that did not fit on its disk: the bytes it needed and the bytes that were free."""

    def __init__(self, error: OSError, needed: int):
        super().__init__(error.errno, error.strerror, error.filename)
        self.needed = needed
        try:
            self.free: int | None = shutil.disk_usage(Path(error.filename).parent).free
        except OSError:
            self.free = None


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, lambda handle: json.dump(data, handle, indent=2, sort_keys=False, default=str))


class RunRecord:
    """A run directory and the files in it."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def finished(self) -> bool:
        return self.path(SUMMARY).exists()

    @property
    def has_checkpoint(self) -> bool:
        return self.path(CHECKPOINT).exists()

    def write_config(self, config: dict) -> None:
        write_json(self.path(CONFIG), config)

    def read_config(self) -> dict:
        return read_object(self.path(CONFIG), missing_ok=False)

    def write_environment(self, environment: dict) -> None:
        write_json(self.path(ENVIRONMENT), environment)

    def write_epochs(self, rows: list[dict]) -> None:
        """Rewrite epochs.csv from the full history, so it always agrees with the checkpoint."""
        if not rows:
            return
        buffer = io.StringIO()
        columns = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.path(EPOCHS), lambda handle: handle.write(buffer.getvalue()))

    def read_epochs(self) -> list[dict]:
        """epochs.csv as written: one row per epoch, each cell typed back (the one reader of the file)."""
        if not self.path(EPOCHS).exists():
            return []
        try:
            with open(self.path(EPOCHS), newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise UsageError(f"{self.path(EPOCHS)} is damaged ({error}); a resumed run writes it again from its "
                             f"checkpoint") from None
        # a row cut short or run long (a copy cut off inside it) is no epoch's: DictReader fills in None
        return [{column: epoch_cell(text) for column, text in row.items()} for row in rows
                if None not in row and None not in row.values()]

    def write_gradients(self, gradients: dict) -> None:
        write_json(self.path(GRADIENTS), gradients)

    def read_gradients(self) -> dict | None:
        """gradients.json; None when the run has none (telemetry off, or it never trained a step)."""
        return read_object(self.path(GRADIENTS))

    def write_summary(self, summary: dict) -> None:
        write_json(self.path(SUMMARY), summary)

    def read_summary(self) -> dict:
        return read_object(self.path(SUMMARY), missing_ok=False)


def describe_environment(world_size: int, local_world_size: int, threads: int, device: str, backend: str) -> dict:
    """Versions, host and hardware: what a reader needs to compare two runs. The libraries' versions are their
    installed distributions' (not imported for it: a run that does not use timm or torchvision never imports
    them, 1.5 s of CPU a process)."""
    from importlib.metadata import version

    import torch

    from distcnn import __version__
    from distcnn.config import available_cores

    gpu = None
    if torch.cuda.is_available():
        gpu = {
            "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
        }
    return {
        "distcnn": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "timm": version("timm"),
        "kornia": version("kornia"),
        "host": host_name(),
        "platform": platform.platform(),
        "cpu_cores": available_cores(),
        "threads_per_rank": threads,
        "world_size": world_size,
        "local_world_size": local_world_size,
        "device": device,
        "backend": backend,
        "gpu": gpu,
        "cpu_model": cpu_model(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "placement": json.loads(os.environ[PLACEMENT_ENV]) if os.environ.get(PLACEMENT_ENV) else None,
        "slurm_job_id": slurm_job_id(),
        "git_commit": git_commit(),
    }


def slurm_job_id() -> str | None:
    """The Slurm job this run trained in, as sbatch and squeue name it: ARRAY_TASK for a task of an array."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def cpu_model() -> str | None:
    """The CPU's model name as this machine reports it (Linux /proc/cpuinfo: x86's model name, or an ARM
    board's hardware / cpu model), else platform's; None where neither says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def git_commit() -> str | None:
    """The commit of the distcnn source tree that runs, with `+ uncommitted changes` when its tracked files
    differ from it; None when installed from a package, or git is missing."""
    where = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no", "--",
                                str(where)], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


# ---- reading a run directory (what the study runner, the report and `distcnn show` read) --------------------

def parse_cell(column: str, text: str):
    """Empty -> None (unavailable); numbers parsed; ValueError for a cell that is not a number."""
    if text == "":
        return None
    if column in TEXT_COLUMNS:
        return text
    number = float(text)
    return int(number) if column in ("epoch", "rank", "local_rank") else number


def read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """A series file's rows (numbers parsed, empty cells None) and its header. A line that does not parse is
    skipped, and so is a last line without its newline: a killed rank may have cut it inside a number."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines.pop()
    rows, header = [], None
    for line in lines:
        try:
            cells = next(csv.reader([line]), [])
            if header is None:
                header = cells
            elif len(cells) == len(header):
                rows.append({column: parse_cell(column, cell) for column, cell in zip(header, cells)})
        except (csv.Error, ValueError):
            continue
    return rows, header or []


def rank_files(run_dir: str | Path) -> dict[int, Path]:
    """telemetry/rank{R}.csv by rank, in numeric order (rank10 after rank9)."""
    found = {}
    for path in (Path(run_dir) / TELEMETRY).glob("rank*.csv"):
        match = re.fullmatch(r"rank(\d+)\.csv", path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def read_rank_rows(path: Path) -> list[dict]:
    try:
        return read_rows(path)[0]
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error}") from None


def read_series(run_dir: str | Path) -> dict[int, list[dict]]:
    """Every rank's resource time series: rank -> rows (see read_rows); UsageError when a file cannot be read."""
    return {rank: read_rank_rows(path) for rank, path in rank_files(run_dir).items()}


def per_host(series: dict[int, list[dict]], column: str) -> dict[str, list[dict]]:
    """For each host, the rows of its first rank that carries `column` (host-wide figures come from local
    rank 0 only, so other ranks' cells are empty)."""
    chosen = {}
    for rank, rows in series.items():
        host = next((row["host"] for row in rows if row.get("host")), f"rank {rank}")
        if host not in chosen and any(row.get(column) is not None for row in rows):
            chosen[host] = rows
    return chosen


def read_object(path: Path, missing_ok: bool = True) -> dict | None:
    """A JSON object file of a run (summary.json, environment.json); None when it is not there (and
    `missing_ok`); UsageError when it cannot be read or is not an object."""
    if missing_ok and not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        raise UsageError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise UsageError(f"cannot read {path}: not a JSON object")
    return data


def epoch_cell(text: str | None) -> int | float | str | None:
    """A cell of epochs.csv as its writer held it: an integer, a number (nan and inf included), None for an
    empty cell (a figure not measured that epoch), else text."""
    if text is None or text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
