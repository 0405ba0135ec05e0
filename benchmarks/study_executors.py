"""What a study's executor costs: the same 4-run study (2x2, single-rank, single-thread runs) one run after
another here (`--executor local`, the reference), two at a time here (`--parallel 2`), and as Slurm jobs on a
one-node cluster started for the benchmark (tests/slurm_cluster.py: this host, its cores), once with jobs that
take every core (one job at a time: the pure overhead of submitting, scheduling and watching) and once with
one-core jobs (the cluster runs two at once). Wall time of the whole `distcnn study` command, side by side in
one invocation.

    .venv/bin/python benchmarks/study_executors.py [--epochs 3] [--images 3000] [--model simplecnn]

Slurm rows need root and the Debian packages (`make slurm`); without them they say unavailable.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the one-node cluster the tests use

STUDY = """
[base]
data = "synthetic:n={images}"
epochs = {epochs}
batch-size = 32
threads = 1
[factors]
policy = ["none", "flip-crop"]
model = ["{model}", "lenet"]
[study]
replicates = 1
responses = ["test_accuracy", "train_seconds"]
"""


def timed_study(spec: Path, out: Path, *flags: str, env: dict | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "distcnn", "study", str(spec), "--out", str(out), "--no-report",
                           *flags], cwd=ROOT, env=os.environ | (env or {}), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or "4/4 runs done" not in done.stdout:
        raise SystemExit(f"{' '.join(flags) or 'local'} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--model", default="simplecnn")
    parser.add_argument("--no-slurm", action="store_true", help="only the two local rows")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-executors-"))
    spec = folder / "study.toml"
    spec.write_text(STUDY.format(images=args.images, epochs=args.epochs, model=args.model))
    cores = len(os.sched_getaffinity(0))
    rows = [("local, one run after another", timed_study(spec, folder / "local"))]
    rows.append(("local --parallel 2", timed_study(spec, folder / "parallel", "--parallel", "2")))
    try:
        from slurm_cluster import ClusterUnavailable, start_cluster
    except ImportError as error:
        start_cluster, reason = None, str(error)
    if args.no_slurm:
        start_cluster, reason = None, "left out (--no-slurm)"
    cluster = None
    if start_cluster is not None:
        try:
            (folder / "slurm").mkdir()
            cluster = start_cluster(folder / "slurm")
        except ClusterUnavailable as error:
            reason = str(error)
    try:
        for label, cpus in ((f"slurm, jobs of {cores} cores (one at a time)", cores),
                            ("slurm, jobs of 1 core (two at a time)", 1)):
            if cluster is None:
                rows.append((label, None))
                continue
            flags = ["--executor", "slurm", "--partition", cluster.partition, "--cpus-per-task", str(cpus),
                     "--time", "30"]
            rows.append((label, timed_study(spec, folder / f"slurm{cpus}", *flags, env=cluster.env)))
    finally:
        if cluster is not None:
            cluster.stop()
    table = Table(title=f"a 4-run study ({args.model}/lenet, {args.images} images, {args.epochs} epochs, one rank "
                        f"of one thread per run) on {cores} cores")
    for column in ("executor", "wall time (s)", "× local"):
        table.add_column(column, justify="right" if column != "executor" else "left")
    reference = rows[0][1]
    for label, seconds in rows:
        table.add_row(label, f"{seconds:.1f}" if seconds else "unavailable",
                      f"{seconds / reference:.2f}" if seconds else "unavailable")
    Console().print(table)
    if cluster is None:
        print(f"slurm rows unavailable: {reason}")


if __name__ == "__main__":
    main()
