"""The CNN-DNN against the global CNN: training wall time and test accuracy, same data, epochs and cores.

Every variant runs through `distcnn train` on 2 ranks (1 thread each) of this machine, one after another:
  global        the CNN on whole images, data-parallel (DDP)
  dd PxQ        independent local CNNs (dealt to the 2 ranks, each rank's trained together as one model) + the
                dense aggregator; mean and vote too
  coherent PxQ  local CNNs + dense aggregator trained as one model (DDP)
  transfer PxQ  coherent, started from the independent run's local CNNs

    .venv/bin/python benchmarks/decomposition.py [--grids 2x2,4x4] [--epochs 2] [--subset 10000] [--model simplecnn]
        [--modes independent,coherent,transfer]

`÷ global` is the training time over the global CNN's, `FLOPs ÷ global` the training FLOPs per image over its:
for an independent CNN-DNN the FLOP ratio is the bound its time could reach, so the gap between the two columns
is what the local CNNs lose to fixed per-step costs (launches, BatchNorm, pooling: work FLOPs do not count).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchdata import data_spec
from distcnn.config import make_config
from distcnn.launch import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grids", default="2x2,4x4")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--subset", type=int, default=10000)
    parser.add_argument("--model", default="simplecnn")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--modes", default="independent,coherent,transfer")
    args = parser.parse_args()
    data = data_spec()
    base = {"data": data, "train_subset": args.subset, "epochs": args.epochs, "model": args.model,
            "nproc_per_node": args.ranks, "batch_size": 64}
    console = Console(width=160)
    console.print(f"{data}: {args.subset} training images, {args.model}, {args.epochs} epochs, {args.ranks} ranks")
    table = Table(title="global CNN vs CNN-DNN (train wall seconds: the local phase in parallel + the aggregator)")
    for column in ("variant", "train s", "local s", "aggregator s", "÷ global", "FLOPs ÷ global", "params",
                   "GFLOPs/img", "test acc", "local acc mean [min, max]", "dnn", "mean", "vote"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        summary = run(make_config(base | {"out": str(out / "global")}))
        baseline = summary
        add_row(table, "global", summary, baseline)
        modes = args.modes.split(",")
        for grid in args.grids.split(","):
            independent = out / f"dd-{grid}"
            summary = run(make_config(base | {"out": str(independent), "strategy": "dd", "grid": grid}))
            if "independent" in modes:
                add_row(table, f"dd {grid} independent", summary, baseline)
            for mode in (mode for mode in ("coherent", "transfer") if mode in modes):
                extra = {"init_from": str(independent)} if mode == "transfer" else {}
                summary = run(make_config(base | {"out": str(out / f"{mode}-{grid}"), "strategy": "dd",
                                                  "grid": grid, "dd_mode": mode} | extra))
                add_row(table, f"dd {grid} {mode}", summary, baseline)
    console.print(table)


def add_row(table: Table, name: str, summary: dict, baseline: dict) -> None:
    seconds, global_seconds = summary["train_seconds"], baseline["train_seconds"]
    phases = summary.get("phases") or {}

    def phase(key: str) -> str:
        value = (phases.get(key) or {}).get("seconds")
        return f"{value:.1f}" if value is not None else "-"

    locals_ = summary.get("local_test_accuracy") or []
    aggregators = summary.get("aggregators") or {}

    def score(key: str) -> str:
        value = (aggregators.get(key) or {}).get("test_accuracy")
        return f"{value:.4f}" if value is not None else "-"

    local = (f"{statistics.mean(locals_):.4f} [{min(locals_):.4f}, {max(locals_):.4f}]" if locals_ else "-")
    flops = summary["train_flops_per_image"] / baseline["train_flops_per_image"]
    table.add_row(name, f"{seconds:.1f}", phase("local"), phase("aggregator"), f"{seconds / global_seconds:.3f}",
                  f"{flops:.3f}", f"{summary['params']:,}",
                  f"{summary['train_flops_per_image'] / 1e9:.4f}", f"{summary['test_accuracy']:.4f}", local,
                  score("dnn"), score("mean"), score("vote"))


if __name__ == "__main__":
    main()
