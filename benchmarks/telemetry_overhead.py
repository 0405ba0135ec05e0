"""What accounting costs: epoch time with telemetry on vs off, interleaved epoch by epoch in one run.

Each rank builds the same model twice — one trainer with accounting on (sampler thread, step timers, the
counting comm hook, DDP's runtime timers), one with it off (DDP's built-in allreduce) — and trains them
alternately, one epoch each, swapping which goes first every round. The sampler runs only during the "on"
epochs. The ratio on/off is taken per round (this machine is noisy: only side-by-side ratios mean much).
1 rank runs in this process; 2 ranks run under torchrun (the script relaunches itself).

    .venv/bin/python benchmarks/telemetry_overhead.py [--rounds 20] [--model simplecnn] [--subset 2048]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchdata import data_spec
from distcnn.config import make_config
from distcnn.parallel import world as group
from distcnn.record import RunRecord
from distcnn.telemetry.accounting import DDP_SAMPLE_EVERY, Accounting
from distcnn.telemetry.steps import PHASES, StepTimer
from distcnn.trainer import Trainer


def t_quantile(degrees: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, degrees))


def measure(args, world: int) -> dict:
    """Run on this rank; returns per-round seconds of the on and off epochs (rank 0's view)."""
    options = {"data": args.data, "model": args.model, "train_subset": args.subset, "batch_size": args.batch,
               "val_fraction": 0.0, "epochs": 1000, "nproc_per_node": world, "sample_interval": args.interval}
    configs = {mode: make_config(options | {"telemetry": mode}) for mode in ("on", "off")}
    ranks = group.setup(configs["on"])
    folder = Path(args.folder)
    trainers, accountings = {}, {}
    for mode, config in configs.items():
        accountings[mode] = Accounting(config, RunRecord(folder / mode), ranks)
        trainers[mode] = Trainer(config, RunRecord(folder / mode), ranks, accountings[mode])
    sampler = accountings["on"].sampler
    sampler.stop()
    seconds = {"on": [], "off": []}
    for round_ in range(args.rounds + 1):  # round 0 warms both up and is not counted
        for mode in (("on", "off") if round_ % 2 else ("off", "on")):
            if mode == "on":
                sampler.start()
            group.barrier(ranks)
            start = time.perf_counter()
            trainers[mode]._train_epoch(round_)
            accountings[mode].end_epoch(round_)
            elapsed = group.all_reduce_max(time.perf_counter() - start, ranks)
            if mode == "on":
                sampler.stop()
            if round_:
                seconds[mode].append(elapsed)
    steps = trainers["on"].steps_per_epoch
    components = component_costs(accountings["on"], trainers["on"], args.interval)
    components["hook_ratio"] = hook_cost(trainers, accountings["on"])
    group.teardown(ranks)
    return {"world": world, "steps": steps, "seconds": seconds, "components": components}


def per_call(function, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


def component_costs(accounting: Accounting, trainer: Trainer, interval: float) -> dict:
    """Each part of accounting timed on its own (far below the epoch-to-epoch noise of a shared machine)."""
    timer = StepTimer(torch.device("cpu"))
    timer.start()

    def step() -> None:
        for phase in PHASES:
            timer.mark(phase)
        timer.end_step()

    costs = {"timer_s_per_step": per_call(step, 20000),
             "sample_s": per_call(accounting.sampler.sample, 200) if accounting.sampler else None,
             "interval_s": interval, "ddp_log_s_per_step": None}
    if trainer.ddp is not trainer.model:
        costs["ddp_log_s_per_step"] = per_call(trainer.ddp._get_ddp_logging_data, 200) / DDP_SAMPLE_EVERY
    return costs


def hook_cost(trainers: dict, accounting: Accounting, pairs: int = 150) -> float | None:
    """Forward + backward with the counting hook over the same without it (DDP's built-in allreduce),
    alternating step by step on one batch: the median ratio of the pairs."""
    on, off = trainers["on"], trainers["off"]
    if on.ddp is on.model:
        return None
    images, labels = next(iter(on.inputs))
    x, y = on.inputs.prepare(images, labels)
    ratios = []
    for pair in range(pairs + 5):
        seconds = {}
        for mode in (("on", "off") if pair % 2 else ("off", "on")):
            trainer = trainers[mode]
            start = time.perf_counter()
            trainer.criterion(trainer.ddp(x), y).backward()
            seconds[mode] = time.perf_counter() - start
            trainer.optimizer.zero_grad(set_to_none=True)
            if mode == "on":
                accounting.counter.take()
        if pair >= 5:  # warm-up pairs are not counted
            ratios.append(seconds["on"] / seconds["off"])
    return statistics.median(ratios)


def relaunch_under_torchrun(args, world: int, result: Path) -> None:
    from torch.distributed.run import parse_args, run

    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
    argv = [f"--nproc-per-node={world}", "--standalone", __file__, "--worker", "--result", str(result),
            "--rounds", str(args.rounds), "--model", args.model, "--subset", str(args.subset),
            "--batch", str(args.batch), "--data", args.data, "--interval", str(args.interval),
            "--folder", args.folder]
    run(parse_args(argv))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--model", default="simplecnn")
    parser.add_argument("--subset", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.5, help="sample interval of the sampler (s)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data = args.data or data_spec()
    if args.worker:  # one rank of the torchrun job
        figures = measure(args, int(os.environ["WORLD_SIZE"]))
        if int(os.environ["RANK"]) == 0:
            Path(args.result).write_text(json.dumps(figures))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    results = {}
    console.print(f"{args.data}: {args.subset} images, {args.model}, batch {args.batch} per rank, "
                  f"{args.rounds} rounds, sample interval {args.interval} s, torch {torch.__version__}")
    table = Table(title="epoch time, accounting on vs off, interleaved epoch by epoch")
    for column in ("ranks", "steps/epoch", "off s (median)", "on s (median)", "on/off (median of rounds)",
                   "on/off mean ± 95% CI", "best on / best off"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as folder:
        for world in (int(w) for w in args.worlds.split(",")):
            args.folder = str(Path(folder) / f"world{world}")
            if world == 1:
                torch.set_num_threads(os.cpu_count() or 1)
                figures = measure(args, 1)
            else:
                result = Path(folder) / f"world{world}.json"
                relaunch_under_torchrun(args, world, result)
                figures = json.loads(result.read_text())
            results[world] = figures
            on, off = figures["seconds"]["on"], figures["seconds"]["off"]
            ratios = [a / b for a, b in zip(on, off)]
            half_width = t_quantile(len(ratios) - 1) * statistics.stdev(ratios) / math.sqrt(len(ratios))
            table.add_row(str(world), str(figures["steps"]), f"{statistics.median(off):.3f}",
                          f"{statistics.median(on):.3f}", f"{statistics.median(ratios):.4f}",
                          f"{statistics.mean(ratios):.4f} ± {half_width:.4f}", f"{min(on) / min(off):.4f}")
    console.print(table)
    parts = Table(title="accounting's parts timed alone, as a share of the step (or of the sample interval)")
    for column in ("ranks", "step s (median)", "step timers µs/step", "DDP timer reads µs/step",
                   "sampler ms/sample", "fwd+bwd counting hook / built-in", "estimated on/off"):
        parts.add_column(column, justify="right")
    for world, figures in results.items():
        c = figures["components"]
        step = statistics.median(figures["seconds"]["off"]) / figures["steps"]
        per_step = c["timer_s_per_step"] + (c["ddp_log_s_per_step"] or 0.0)
        estimate = (c["hook_ratio"] or 1.0) + per_step / step + (c["sample_s"] or 0.0) / c["interval_s"]
        ddp = f"{c['ddp_log_s_per_step'] * 1e6:.1f}" if c["ddp_log_s_per_step"] is not None else "-"
        hook = f"{c['hook_ratio']:.4f}" if c["hook_ratio"] is not None else "-"
        parts.add_row(str(world), f"{step:.4f}", f"{c['timer_s_per_step'] * 1e6:.1f}", ddp,
                      f"{c['sample_s'] * 1e3:.3f}", hook, f"{estimate:.4f} (estimate)")
    console.print(parts)

if __name__ == "__main__":
    sys.exit(main())
