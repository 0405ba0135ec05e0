"""How to run a rank's local CNNs together (StackedLocals): one after another inside one forward, or vmap over
their stacked weights (torch.func: batched, i.e. grouped, convolutions), beside one step of the global CNN; the
row distcnn runs (StackedLocals' default) is marked. Training step time (forward, backward, AdamW) on this machine, one thread, side by side.

    .venv/bin/python benchmarks/stacking.py [--steps 30] [--batch 64] [--threads 1] [--layout channels-last]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from distcnn.decomposition import local_width
from distcnn.decomposition.models import StackedLocals, SummedLoss, build_local
from distcnn.decomposition.subimages import Grid
from distcnn.models import create_model

CASES = (("2x2", 2), ("2x2", 4), ("4x4", 8), ("4x4", 16))  # grid, local CNNs a rank holds (2 ranks, 1 rank)


def timed(step, steps: int) -> float:
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layout", choices=("channels-last", "contiguous"), default="channels-last")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fmt = torch.channels_last if args.layout == "channels-last" else torch.contiguous_format
    images = torch.randn(args.batch, 1, 28, 28).contiguous(memory_format=fmt)
    labels = torch.randint(0, 10, (args.batch,))
    loss = nn.CrossEntropyLoss()

    global_cnn = create_model("simplecnn", in_chans=1, num_classes=10).to(memory_format=fmt)
    optimizer = torch.optim.AdamW(global_cnn.parameters())

    def global_step():
        loss(global_cnn(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad()

    baseline = timed(global_step, args.steps)
    table = Table(title=f"ms per training step, batch {args.batch}, {args.threads} thread(s), {args.layout}")
    for column in ("variant", "ms/step", "÷ global step", "loop ÷ vmap"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    table.add_row("global simplecnn 28x28", f"{baseline * 1e3:.1f}", "1.000", "")
    for grid, count in CASES:
        layout = Grid.parse(grid).layout(28, 28)
        cnns = [build_local("simplecnn", 1, 10, layout, k, 1.0) for k in range(count)]
        summed = SummedLoss()

        def step_of(batched: bool):
            stacked = StackedLocals(copy.deepcopy(cnns), batched).to(memory_format=fmt)
            optimizer = torch.optim.AdamW(stacked.parameters())

            def step():
                summed(stacked(images), labels).backward()
                optimizer.step()
                optimizer.zero_grad()
                summed.take()
            return step

        loop_step, vmap_step = step_of(False), step_of(True)
        loop_seconds, vmap_seconds = timed(loop_step, args.steps), timed(vmap_step, args.steps)
        width = local_width(1.0, layout.share())
        chosen = "loop"  # StackedLocals' default
        for name, seconds in (("loop", loop_seconds), ("vmap", vmap_seconds)):
            table.add_row(f"{grid}: {count} local CNNs {layout.sub_height}x{layout.sub_width}, width {width:.2f}, "
                          f"{name}{' (distcnn)' if name == chosen else ''}", f"{seconds * 1e3:.1f}", f"{seconds / baseline:.3f}",
                          f"{loop_seconds / vmap_seconds:.2f}" if name == "vmap" else "")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
