"""`--strategy ddp`: one model (the config's), data-parallel over every rank of the job."""

from __future__ import annotations

from distcnn.config import TrainConfig
from distcnn.data import DataSplits
from distcnn.parallel.ranks import Ranks
from distcnn.record import RunRecord
from distcnn.strategies import register_strategy
from distcnn.trainer import train_run


class DataParallel:
    name = "ddp"

    def validate(self, config: TrainConfig, splits: DataSplits) -> None:
        """Nothing beyond what every run checks (data, model, augmentation, ranks)."""

    def run(self, config: TrainConfig, record: RunRecord, ranks: Ranks) -> None:
        train_run(config, record, ranks)


register_strategy(DataParallel())
