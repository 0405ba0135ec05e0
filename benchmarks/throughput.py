"""Training throughput: what the input pipeline and each augmentation backend cost next to the model itself.

All rows come from one run, measured in interleaved rounds (this machine is noisy; ratios measured side by side
mean more than absolute figures). Per model, at batch 128 on one rank:
  model-only            training steps on resident, already-normalised batches (no input pipeline at all)
  none                  the whole pipeline (gather, to device, normalise) with policy none
  paper batched         + the `paper` policy on the whole batch, on the device
  paper per-sample/wN   + the `paper` policy image by image in N DataLoader workers (torchvision v2)
Then augmentation alone: one batch through the batched backend vs the same images one by one.

    .venv/bin/python benchmarks/throughput.py [--models simplecnn,mobilenetv2_100] [--rounds 7] [--steps 8]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from distcnn.augment import build_augment
from distcnn.config import available_cores, make_config
from distcnn.data import load_data
from distcnn.models import create_model
from distcnn.parallel.ranks import Ranks
from distcnn.pipeline import TrainInputs


def load(data: str, subset: int):
    try:
        return load_data(data, train_subset=subset)
    except Exception:  # noqa: BLE001 — no Fashion-MNIST here: fall back to generated images
        return load_data("synthetic:n=6000", train_subset=min(subset, 5000))


class Trainee:
    """A model with its optimiser, stepping on whatever batches it is given."""

    def __init__(self, name: str, splits):
        torch.manual_seed(0)
        self.model = create_model(name, in_chans=splits.channels, num_classes=splits.num_classes)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.criterion = torch.nn.CrossEntropyLoss()

    def step(self, x, y) -> None:
        loss = self.criterion(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def images_per_second(trainee: Trainee, batches, steps: int, warmup: int = 3) -> float:
    iterator = iter(batches)
    for x, y in itertools.islice(iterator, warmup):
        trainee.step(x, y)
    count, start = 0, time.perf_counter()
    for x, y in itertools.islice(iterator, steps):
        trainee.step(x, y)
        count += x.shape[0]
    return count / (time.perf_counter() - start)


def resident_batches(splits, batch: int, count: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches prepared in advance (normalised real images): the model's cost with no input pipeline at all.
    Many distinct batches, not one: a model trained on one batch over and over fits it, its gradients shrink
    towards denormal floats, and the CPU slows down for reasons that have nothing to do with input."""
    mean = torch.tensor(splits.mean).view(1, -1, 1, 1)
    std = torch.tensor(splits.std).view(1, -1, 1, 1)
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))[: batch * count]
    images = (splits.train.images[order].float() / 255 - mean) / std
    labels = splits.train.labels[order]
    return [(images[i : i + batch], labels[i : i + batch]) for i in range(0, len(order), batch)]


def endless(inputs: TrainInputs):
    for epoch in itertools.count():
        inputs.set_epoch(epoch)
        for images, labels in inputs:
            yield inputs.prepare(images, labels)


def pipeline_configs(batch: int, workers: list[int]) -> dict:
    options = {"batch_size": batch, "data": "synthetic"}
    configs = {"none": make_config(options | {"policy": "none"}),
               "paper batched": make_config(options | {"policy": "paper"})}
    for n in workers:
        configs[f"paper per-sample/w{n}"] = make_config(
            options | {"policy": "paper", "aug_backend": "per-sample", "workers": n})
    return configs


def pipeline_rate(trainee: Trainee, splits, config, steps: int) -> float:
    """A fresh pipeline per measurement, dropped afterwards: idle DataLoader workers of one row must not
    prefetch in the background while the next row is timed."""
    inputs = TrainInputs(splits, config, Ranks.single(torch.device("cpu")))
    rate = images_per_second(trainee, endless(inputs), steps)
    del inputs
    gc.collect()
    return rate


def augmentation_alone(splits, batch: int, rounds: int) -> tuple[float, float]:
    """Seconds to augment one batch: batched backend vs the per-sample transform over the same images."""
    images = splits.train.images[:batch]
    batched = build_augment("paper", "batched", splits.channels, splits.image_size)
    per_sample = build_augment("paper", "per-sample", splits.channels, splits.image_size)
    x = images.float() / 255
    batched(x)
    batched_times, per_sample_times = [], []
    for _ in range(rounds * 5):
        start = time.perf_counter()
        batched(x)
        batched_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for image in images:
            per_sample(image)
        per_sample_times.append(time.perf_counter() - start)
    return statistics.median(batched_times), statistics.median(per_sample_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="simplecnn,mobilenetv2_100")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--workers", default="1,2,3", help="DataLoader worker counts tried for per-sample")
    parser.add_argument("--data", default="fashion-mnist")
    args = parser.parse_args()
    threads = available_cores()
    torch.set_num_threads(threads)
    splits = load(args.data, subset=10000)
    workers = [int(n) for n in args.workers.split(",")]
    console = Console()
    console.print(f"{splits.name}: {len(splits.train)} train images {splits.channels}×{splits.image_size}², "
                  f"batch {args.batch}, {threads} threads, torch {torch.__version__}, rounds {args.rounds}")

    table = Table(title="training images/s over interleaved rounds: median, and best round (the least disturbed)")
    for column in ("model", "pipeline", "median img/s", "× model-only", "best img/s", "× model-only (best)"):
        table.add_column(column, justify="left" if column in ("model", "pipeline") else "right")
    for name in args.models.split(","):
        trainee = Trainee(name, splits)
        resident = resident_batches(splits, args.batch)
        configs = pipeline_configs(args.batch, workers)
        rates = {label: [] for label in ["model-only", *configs]}
        for _ in range(args.rounds):
            rates["model-only"].append(images_per_second(trainee, itertools.cycle(resident), args.steps))
            for label, config in configs.items():
                rates[label].append(pipeline_rate(trainee, splits, config, args.steps))
        median = {label: statistics.median(values) for label, values in rates.items()}
        best = {label: max(values) for label, values in rates.items()}
        per_sample = [label for label in rates if "per-sample" in label]
        best_per_sample = max(per_sample, key=best.get)
        for label in rates:
            mark = "  (best per-sample)" if label == best_per_sample else ""
            table.add_row(name, label + mark, f"{median[label]:,.0f}", f"{median[label] / median['model-only']:.3f}",
                          f"{best[label]:,.0f}", f"{best[label] / best['model-only']:.3f}")
        table.add_row(name, "paper batched ÷ best per-sample", "",
                      f"{median['paper batched'] / median[best_per_sample]:.2f}", "",
                      f"{best['paper batched'] / best[best_per_sample]:.2f}")
    console.print(table)

    batched_s, per_sample_s = augmentation_alone(splits, args.batch, args.rounds)
    aug = Table(title=f"`paper` augmentation alone, one batch of {args.batch} (one process)")
    for column in ("backend", "ms per batch", "images/s"):
        aug.add_column(column, justify="left" if column == "backend" else "right")
    aug.add_row("batched", f"{batched_s * 1e3:.2f}", f"{args.batch / batched_s:,.0f}")
    aug.add_row("per-sample (torchvision v2)", f"{per_sample_s * 1e3:.2f}", f"{args.batch / per_sample_s:,.0f}")
    aug.add_row("batched speed-up", "", f"{per_sample_s / batched_s:.1f}×")
    console.print(aug)


if __name__ == "__main__":
    main()
