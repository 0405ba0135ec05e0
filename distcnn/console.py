"""What a person sees while a run trains: a progress bar inside the epoch, a fixed-column table per epoch.

Only rank 0 prints. The progress bar appears only on a terminal, so logs and CI output stay clean.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distcnn.parallel.ranks import Ranks

_console = Console(highlight=False)


def say(message: str, ranks: Ranks | None = None) -> None:
    if ranks is None or ranks.is_main:
        _console.print(message, markup=False, soft_wrap=True)


def loaded_line(splits, model: str, world_size: int, device_type: str) -> str:
    """The line before the first epoch: what was loaded and what trains it, so a slow start is not silent."""
    ranks = f"{world_size} rank{'s' if world_size != 1 else ''}"
    return (f"{splits.name}: {len(splits.train):,} train / {len(splits.val):,} val / {len(splits.test):,} test "
            f"images, {model}, {ranks} on {device_type}")


class StepProgress:
    """A transient bar over the steps of one epoch: images/s, the running loss, CPU % and network MB/s."""

    REFRESH_EVERY = 10  # steps between loss read-outs (reading the loss syncs the device)

    def __init__(self, ranks: Ranks, description: str, total: int, live=None):
        self.enabled = ranks.is_main and sys.stdout.isatty()
        self.live = live  # () -> str: the latest resource figures (CPU %, network MB/s)
        self.total = total
        self.description = description
        self.progress = None

    def __enter__(self) -> "StepProgress":
        if self.enabled:
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), transient=True, console=_console)
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=self.total, stats="")
        return self

    def advance(self, step: int, loss, images: int, seconds: float) -> None:
        if self.progress is None:
            return
        stats = None
        if step % self.REFRESH_EVERY == 0 or step + 1 == self.total:
            stats = f"loss {loss.item():.3f}  {images / max(seconds, 1e-9):,.0f} img/s (this rank)"
            if self.live is not None:
                stats += f"  {self.live()}"
        if stats is None:
            self.progress.advance(self.task)
        else:
            self.progress.update(self.task, advance=1, stats=stats)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


class EpochTable:
    """One fixed-width line per epoch, header first (as airbench prints it)."""

    COLUMNS = (("epoch", 5, "d"), ("train_loss", 10, ".4f"), ("val_accuracy", 12, ".4f"),
               ("images_per_second", 17, ",.0f"), ("train_seconds", 13, ".1f"), ("epoch_seconds", 13, ".1f"))

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.header_done = False

    def row(self, values: dict, improved: bool) -> None:
        if not self.ranks.is_main:
            return
        if not self.header_done:
            say("  ".join(f"{name:>{width}}" for name, width, _ in self.COLUMNS) + "  best")
            self.header_done = True
        cells = []
        for name, width, fmt in self.COLUMNS:
            value = values.get(name)
            cells.append(f"{'-' if value is None else format(value, fmt):>{width}}")
        say("  ".join(cells) + ("     *" if improved else ""))
