"""A CNN-DNN's decomposition for one run, made once: its grid laid on the data's images, how each local CNN is
built, and where each local CNN's run record lives. Every part of `--strategy dd` (validation, the local
phase, the 1x1 grid's global CNN, the probabilities, the coherent model) takes its local CNNs from here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distcnn.config import TrainConfig
from distcnn.data import DataSplits
from distcnn.decomposition.models import LocalCNN, StackedLocals, build_local
from distcnn.decomposition.subimages import Grid, Layout
from distcnn.record import RunRecord

LOCAL = "local"  # RUN_DIR/local/kNN/: local CNN k's run record; RUN_DIR/local/rankR/: rank R's local phase


def local_record(run_dir: Path, index: int) -> RunRecord:
    return RunRecord(Path(run_dir) / LOCAL / f"k{index:02d}")


def phase_record(run_dir: Path, rank: int) -> RunRecord:
    return RunRecord(Path(run_dir) / LOCAL / f"rank{rank}")


def subdomains_of(rank: int, world_size: int, count: int) -> list[int]:
    """Round-robin: rank r trains subdomains r, r + N, r + 2N, … (balanced to within one)."""
    return list(range(rank, count, world_size))


@dataclass(frozen=True)
class Decomposition:
    config: TrainConfig
    layout: Layout
    channels: int
    num_classes: int

    @classmethod
    def of(cls, config: TrainConfig, splits: DataSplits) -> Decomposition:
        layout = Grid.parse(config.grid, config.overlap).layout(splits.image_size, splits.image_size)
        return cls(config, layout, splits.channels, splits.num_classes)

    @property
    def count(self) -> int:
        return len(self.layout.boxes)

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """--aggregator-hidden '64,32' -> (64, 32); '' -> no hidden layer."""
        return tuple(int(size) for size in self.config.aggregator_hidden.split(",") if size.strip())

    def local(self, index: int) -> LocalCNN:
        c = self.config
        return build_local(c.model, self.channels, self.num_classes, self.layout, index, c.width, c.local_width)

    def stacked(self, indices: list[int]) -> StackedLocals:
        """Local CNNs `indices` as one model; each starts from the weights it would have alone (the run's seed
        before each is built)."""
        cnns = []
        for index in indices:
            torch.manual_seed(self.config.seed)
            cnns.append(self.local(index))
        return StackedLocals(cnns)

    def builder(self, index: int):
        """What the training loop calls to build local CNN `index` for the data it loaded."""
        def build(splits: DataSplits) -> nn.Module:
            return self.local(index)
        return build

    def figures(self) -> dict:
        """What a CNN-DNN's summary says of its decomposition."""
        c = self.config
        return {"strategy": "dd", "grid": c.grid, "overlap": c.overlap, "dd_mode": c.dd_mode,
                "subimage_size": [self.layout.sub_height, self.layout.sub_width]}
