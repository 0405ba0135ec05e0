"""Training at the hardware's speed: distcnn's settings side by side with plain loops, on whatever device is here.

Rows, all in one run (interleaved over --rounds; the median of the rounds is shown):
  plain loop             a loop written here in a few lines: images resident on the device as normalised fp32,
                         a random permutation per epoch, fp32, no augmentation, no accounting
  plain per-sample loop  the same model in fp32 fed by a DataLoader (the --workers of the per-sample rows) whose
                         workers run torchvision v2's own transforms for `paper` image by image, pinned memory,
                         non-blocking copies, persistent workers, prefetching
  distcnn SETTINGS       `distcnn train` itself (its run(), accounting on) at fp32, bf16, bf16 + channels-last
                         and bf16 + channels-last + compile, each with policy none, paper batched and paper
                         per-sample
Every row trains --epochs epochs over the same --images training images; images/s, GPU util (NVML, time-weighted,
GPU only) and the step breakdown (distcnn's own step timers) are taken from the last epoch, so cuDNN's and
oneDNN's first-call costs and compilation (distcnn times it apart: compile s) are not counted. Ratios: × plain is
against the plain loop, × fp32 against distcnn fp32 with the same policy and backend.
Then, with --tta (default: on a GPU), the time to 0.90 validation accuracy on Fashion-MNIST for the default and
the fastest settings: the run's training seconds and the whole command's wall seconds, shell to summary.json.

    .venv/bin/python benchmarks/gpu.py                                  # CPU here: simplecnn, 28 px, batch 128
    .venv/bin/python benchmarks/gpu.py --model resnet18 --image-size 32 --batch 256 --images 30000   # a GPU
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from benchdata import data_spec
from distcnn.config import available_cores, make_config
from distcnn.data import load_data
from distcnn.models import create_model
from distcnn.speed import missing_toolchain
from distcnn.telemetry.counters import Nvml
from distcnn.record import read_rows
from distcnn.telemetry.sampler import time_weighted_mean
from distcnn.telemetry.steps import PHASES
from distcnn.launch import run

SETTINGS = {  # label -> options of `distcnn train`
    "fp32": {"precision": "fp32", "memory_format": "contiguous"},
    "fp32 + channels-last": {"precision": "fp32", "memory_format": "channels-last"},
    "bf16": {"precision": "bf16", "memory_format": "contiguous"},
    "bf16 + channels-last": {"precision": "bf16", "memory_format": "channels-last"},
    "bf16 + channels-last + compile": {"precision": "bf16", "memory_format": "channels-last", "compile": "default"},
}
PIPELINES = {"none": {"policy": "none"}, "paper batched": {"policy": "paper"},
             "paper per-sample": {"policy": "paper", "aug_backend": "per-sample"}}


class GpuUtil:
    """NVML utilisation polled every 0.1 s in a thread while a plain loop runs (None on the CPU)."""

    def __init__(self, device: torch.device):
        self.nvml = Nvml(device.index or 0) if device.type == "cuda" else None
        self.values: list[float] = []

    def __enter__(self):
        self.stop = threading.Event()
        if self.nvml is not None and self.nvml.available:
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop.wait(0.1):
            value = self.nvml.read().get("gpu_util_percent")
            if value is not None:
                self.values.append(value)

    def __exit__(self, *exc) -> None:
        self.stop.set()

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.values) if self.values else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(args, splits, device) -> dict:
    """The plain fp32 loop: resident normalised images, one permutation per epoch, nothing else."""
    torch.manual_seed(0)
    model = create_model(args.model, in_chans=splits.channels, num_classes=splits.num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    mean = torch.tensor(splits.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(splits.std, device=device).view(1, -1, 1, 1)
    images = (splits.train.images.to(device).float() / 255 - mean) / std
    labels = splits.train.labels.to(device)
    steps = len(images) // args.batch
    for epoch in range(args.epochs):
        order = torch.randperm(len(images), device=device)
        sync(device)
        with GpuUtil(device) as util:
            start = time.perf_counter()
            for step in range(steps):
                batch = order[step * args.batch : (step + 1) * args.batch]
                loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            sync(device)
            seconds = time.perf_counter() - start
    return {"images_per_second": steps * args.batch / seconds, "gpu_util": util.mean}


class TorchvisionImages(Dataset):
    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), self.labels[index]


def paper_transforms(splits) -> v2.Compose:
    """`paper` as a torchvision user writes it: rotation 5 degrees, shear 0.2 rad, translation 5 %, resized crop
    80-100 %, flip, colour jitter 0.2, then float and normalise."""
    size = splits.image_size
    jitter = v2.ColorJitter(0.2, 0.2, 0.2 if splits.channels == 3 else 0)
    return v2.Compose([v2.RandomRotation(5), v2.RandomAffine(0, translate=(0.05, 0.05), shear=(-11.46, 11.46)),
                       v2.RandomResizedCrop(size, scale=(0.8, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       jitter, v2.ToDtype(torch.float32, scale=True), v2.Normalize(splits.mean, splits.std)])


def plain_per_sample_loop(args, splits, device) -> dict:
    """The plain fp32 loop fed by torchvision v2 transforms in DataLoader workers."""
    torch.manual_seed(0)
    model = create_model(args.model, in_chans=splits.channels, num_classes=splits.num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loader = DataLoader(TorchvisionImages(splits.train.images, splits.train.labels, paper_transforms(splits)),
                        batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda", persistent_workers=True, prefetch_factor=4)
    for epoch in range(args.epochs):
        sync(device)
        with GpuUtil(device) as util:
            start, count = time.perf_counter(), 0
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                count += len(y)
            sync(device)
            seconds = time.perf_counter() - start
    return {"images_per_second": count / seconds, "gpu_util": util.mean}


def distcnn_run(args, folder: Path, label: str, options: dict) -> dict:
    """One `distcnn train` run, in this process; the last epoch's figures from its run record."""
    out = folder / label.replace(" ", "_").replace("+", "")
    config = make_config({"data": args.data, "image_size": args.image_size, "train_subset": args.images,
                          "val_fraction": args.val_fraction, "model": args.model, "batch_size": args.batch,
                          "epochs": args.epochs, "workers": args.workers, "sample_interval": 0.1,
                          "out": str(out)} | options)
    summary = run(config)
    with open(out / "epochs.csv", newline="") as handle:
        last = list(csv.DictReader(handle))[-1]
    rows, _ = read_rows(out / "telemetry" / "rank0.csv")
    train_rows = [row for row in rows if row.get("phase") == "train" and row.get("epoch") == args.epochs]
    return {"images_per_second": float(last["images_per_second"]),
            "gpu_util": time_weighted_mean(train_rows, "gpu_util_percent"),
            "compile_seconds": summary["compile_seconds"],
            **{f"{phase}_ms": float(last[f"{phase}_mean_s"]) * 1e3 for phase in (*PHASES, "step")}}


def time_to_accuracy(args, folder: Path, label: str, options: dict) -> dict:
    """`distcnn train` to 0.90 validation accuracy on Fashion-MNIST, as a user runs it: the whole command."""
    out = folder / f"tta-{label}".replace(" ", "_").replace("+", "")
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    command = [sys.executable, "-m", "distcnn", "train", "--data", "fashion-mnist", "--model", args.tta_model,
               "--batch-size", str(args.tta_batch), "--epochs", str(args.tta_epochs), "--target-accuracy", "0.9",
               "--stop-at-target", "--out", str(out), *flags]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"time to accuracy ({label}) failed: {result.stderr.strip()[-500:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"train_seconds": summary["train_seconds"], "to_target": summary["time_to_target_seconds"],
            "epochs": summary["epochs_to_target"], "wall": wall, "compile_seconds": summary["compile_seconds"]}


def fmt(value, spec: str = ",.0f") -> str:
    return "–" if value is None else format(value, spec)


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18" if gpu else "simplecnn")
    parser.add_argument("--image-size", type=int, default=32 if gpu else None)
    parser.add_argument("--batch", type=int, default=256 if gpu else 128)
    parser.add_argument("--images", type=int, default=30000 if gpu else 3840, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="the last one is measured")
    parser.add_argument("--rounds", type=int, default=1 if gpu else 3)
    parser.add_argument("--workers", type=int, default=min(8, available_cores()))
    parser.add_argument("--settings", default="fp32,bf16,bf16 + channels-last,bf16 + channels-last + compile",
                        help=f"which distcnn settings, of: {', '.join(SETTINGS)}")
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--tta", choices=("on", "off"), default="on" if gpu else "off")
    parser.add_argument("--tta-model", default="simplecnn")
    parser.add_argument("--tta-batch", type=int, default=512)
    parser.add_argument("--tta-epochs", type=int, default=10, help="the schedule's length (it stops at 0.90)")
    parser.add_argument("--data", default=None, help="default: Fashion-MNIST when installed")
    args = parser.parse_args()
    args.data = args.data or data_spec()
    args.val_fraction = 0.05
    for name, chosen, allowed in (("--settings", args.settings, SETTINGS), ("--pipelines", args.pipelines, PIPELINES)):
        unknown = [label for label in chosen.split(",") if label not in allowed]
        if unknown:
            parser.error(f"{name}: unknown {unknown[0]!r}; allowed: {', '.join(allowed)}")
    settings = {label: SETTINGS[label] for label in args.settings.split(",")}
    pipelines = {label: PIPELINES[label] for label in args.pipelines.split(",")}
    if missing_toolchain(device.type):
        settings = {label: options for label, options in settings.items() if "compile" not in options}
    splits = load_data(args.data, image_size=args.image_size, train_subset=args.images,
                       val_fraction=args.val_fraction)
    args.image_size = splits.image_size
    console = Console(width=250)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {available_cores()} cores"
    console.print(f"{name}; torch {torch.__version__}; {args.model} on {splits.name} at {splits.image_size} px, "
                  f"batch {args.batch}, {len(splits.train)} images per epoch, {args.epochs} epochs (the last "
                  f"measured), {args.rounds} round(s), {args.workers} workers for per-sample")

    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            folder = Path(tmp) / f"round{round_}"
            results.setdefault("plain loop", []).append(plain_loop(args, splits, device))
            if "paper per-sample" in pipelines:
                results.setdefault("plain per-sample loop", []).append(plain_per_sample_loop(args, splits, device))
            for setting, options in settings.items():
                for pipeline, policy in pipelines.items():
                    label = f"{setting} | {pipeline}"
                    results.setdefault(label, []).append(distcnn_run(args, folder, label, options | policy))
        tta = {}
        if args.tta == "on":
            fastest = max(settings, key=lambda s: statistics.median(
                r["images_per_second"] for r in results[f"{s} | {next(iter(pipelines))}"]))
            for label in dict.fromkeys(["fp32", fastest]):
                tta[label] = time_to_accuracy(args, Path(tmp), label, settings[label] | {"policy": "none"})

    def median(label: str, key: str):
        values = [r[key] for r in results[label] if r.get(key) is not None]
        return statistics.median(values) if values else None

    table = Table(title=f"{args.model}, {splits.image_size} px, batch {args.batch} on {name}: last epoch, "
                        f"median of {args.rounds} round(s)")
    columns = ["row", "images/s", "× plain", "× fp32", "GPU util %", "compile s", "step ms",
               *(f"{phase} ms" for phase in PHASES)]
    for column in columns:
        table.add_column(column, justify="left" if column == "row" else "right")
    plain = median("plain loop", "images_per_second")
    for label in results:
        rate = median(label, "images_per_second")
        setting, _, pipeline = label.partition(" | ")
        fp32 = median(f"fp32 | {pipeline}", "images_per_second") if pipeline else None
        table.add_row(label, fmt(rate), f"{rate / plain:.2f}", f"{rate / fp32:.2f}" if fp32 else "",
                      fmt(median(label, "gpu_util")), fmt(median(label, "compile_seconds"), ".1f"),
                      fmt(median(label, "step_ms"), ".2f"), *(fmt(median(label, f"{p}_ms"), ".2f") for p in PHASES))
    best = max((label for label in results if " | none" in label), key=lambda label: median(label, "images_per_second"))
    setting = best.partition(" | ")[0]
    table.add_row(f"best ({setting}) none ÷ plain loop", "", f"{median(best, 'images_per_second') / plain:.2f}")
    if f"{setting} | paper batched" in results:
        table.add_row(f"{setting}: paper batched ÷ none", "",
                      f"{median(f'{setting} | paper batched', 'images_per_second') / median(best, 'images_per_second'):.2f}")
    if "plain per-sample loop" in results and "fp32 | paper per-sample" in results:
        reference = median("plain per-sample loop", "images_per_second")
        table.add_row("fp32 paper per-sample ÷ plain per-sample loop", "",
                      f"{median('fp32 | paper per-sample', 'images_per_second') / reference:.2f}")
        table.add_row(f"{setting} paper per-sample ÷ plain per-sample loop", "",
                      f"{median(f'{setting} | paper per-sample', 'images_per_second') / reference:.2f}")
    for label, figures in tta.items():
        table.add_row(f"time to 0.90 val, {label} ({args.tta_model}, batch {args.tta_batch}): train s / to target "
                      f"s / command s, epochs", f"{figures['train_seconds']:.1f} / {figures['to_target']:.1f} / "
                      f"{figures['wall']:.1f}, {figures['epochs']}" if figures["to_target"] is not None
                      else f"not reached in {args.tta_epochs} epochs ({figures['wall']:.1f} s)")
    console.print(table)


if __name__ == "__main__":
    main()
