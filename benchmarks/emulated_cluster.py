"""What a 100 Mbit/s LAN costs data-parallel training: communication's share of the step, two emulated hosts.

Every row is a real 2-node job (`distcnn train --cluster emulated --nnodes 2`, one rank per host, 1 thread
each) on the same cluster, one after another in this one run: a model with large gradients (resnet18, 44.7 MB
per step) and a small one (simplecnn, 0.63 MB), uncapped and at 100 Mbit/s, and at 100 Mbit/s with the fp16
and PowerSGD hooks. The figures are the second epoch's (PowerSGD sends its first step uncompressed).

  exposed comm share = (step − compute step) / step, where the compute step is the same model and per-rank
                       batch trained by one rank with one thread and no communication, measured in this run
  DDP comm ÷ step    = DDP's own timer of its gradient allreduce (overlapping the backward pass) ÷ step

Needs root (network namespaces); brings its own cluster up and takes it down.

    .venv/bin/python benchmarks/emulated_cluster.py [--models resnet18,simplecnn] [--steps 8] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distcnn import cluster

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [("none", "allreduce"), ("100mbit", "allreduce"), ("100mbit", "fp16"), ("100mbit", "powersgd")]


def train(out: Path, model: str, args, extra: list[str]) -> tuple[dict, dict]:
    """One run through the CLI; (summary, the second epoch's row of epochs.csv)."""
    images = int(2 * args.batch_size * args.steps / 0.9) + 2  # 2 ranks × batch × steps after a 10 % validation
    command = [sys.executable, "-m", "distcnn", "train", "--model", model, "--epochs", "2",
               "--data", f"synthetic:n={images},test=256", "--batch-size", str(args.batch_size),
               "--sample-interval", "0.25", "--out", str(out), *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    rows = list(csv.DictReader((out / "epochs.csv").open()))
    return json.loads((out / "summary.json").read_text()), rows[-1]


def number(row: dict, key: str) -> float | None:
    value = row.get(key)
    return float(value) if value not in (None, "") else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet18,simplecnn")
    parser.add_argument("--steps", type=int, default=8, help="steps per rank per epoch")
    parser.add_argument("--batch-size", type=int, default=32, help="images per rank per step")
    args = parser.parse_args()
    try:
        cluster.require_privileges()
    except Exception as error:  # noqa: BLE001 — the one line the CLI would print
        raise SystemExit(f"emulated_cluster: {error}")
    console = Console(width=180)
    table = Table(title=f"2 emulated hosts × 1 rank, batch {args.batch_size}/rank, epoch 2 of 2 "
                        f"({args.steps} steps/rank); compute step = 1 rank, no communication")
    for column in ("model", "link", "hook", "grad MB", "sent MB/step", "step ms", "compute ms", "backward ms",
                   "DDP comm ms", "exposed comm share", "DDP comm ÷ step", "step ÷ uncapped", "host tx MB (h1, h2)"):
        table.add_column(column, justify="left" if column in ("model", "link", "hook") else "right")
    cluster.up(2)
    try:
        with tempfile.TemporaryDirectory() as folder:
            for model in args.models.split(","):
                _, alone = train(Path(folder) / f"{model}-alone", model, args, ["--threads", "1"])
                compute = number(alone, "step_mean_s")
                uncapped = None
                for bandwidth, hook in VARIANTS:
                    out = Path(folder) / f"{model}-{bandwidth}-{hook}"
                    summary, row = train(out, model, args, ["--cluster", "emulated", "--nnodes", "2",
                                                            "--bandwidth", bandwidth, "--comm-hook", hook])
                    step, comm = number(row, "step_mean_s"), number(row, "ddp_comm_mean_s")
                    uncapped = step if (bandwidth, hook) == ("none", "allreduce") else uncapped
                    sent = [summary["hosts"][name]["interfaces"]["eth0"]["tx_bytes"] / 1e6
                            for name in sorted(summary["hosts"])]
                    table.add_row(
                        model, bandwidth, hook, f"{summary['gradient_bytes'] / 1e6:.2f}",
                        f"{number(row, 'comm_bytes_per_step') / 1e6:.3f}", f"{step * 1e3:.0f}",
                        f"{compute * 1e3:.0f}", f"{number(row, 'backward_mean_s') * 1e3:.0f}",
                        f"{comm * 1e3:.0f}" if comm is not None else "n/a",
                        f"{max(0.0, step - compute) / step:.3f}",
                        f"{comm / step:.3f}" if comm is not None else "n/a",
                        f"{step / uncapped:.2f}", ", ".join(f"{mb:.1f}" for mb in sent))
    finally:
        cluster.down()
    console.print(table)
    console.print(f"python {' '.join(sys.argv)}; {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
