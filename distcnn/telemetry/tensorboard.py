"""`--tensorboard`: the run record also as TensorBoard event files (RUN_DIR/tensorboard/), for those who watch runs
there. It only copies what the record holds: each epochs.csv row as it is written (`epoch/<column>`, step =
epoch), and at the end this rank's resource series (`resources/<column>`, step = sample index) and the test
accuracy (`summary/test_accuracy`). Rank 0 writes; a resumed run adds new event files to the same folder.
"""

from __future__ import annotations

import math
from numbers import Real

from distcnn.config import TrainConfig
from distcnn.parallel.ranks import Ranks
from distcnn.record import SUMMARY, TELEMETRY, RunRecord, read_object, read_rank_rows

FOLDER = "tensorboard"
NOT_SERIES = {"time", "elapsed_s", "interval_s", "epoch", "rank", "local_rank"}  # the sample's place, not a figure


def scalars(row: dict, skip: set[str] = frozenset()) -> dict[str, float]:
    """The row's finite numbers (None, text and bools are not scalars)."""
    return {key: float(value) for key, value in row.items() if key not in skip and isinstance(value, Real)
            and not isinstance(value, bool) and math.isfinite(value)}


class EventLog:
    """Rank 0's SummaryWriter; `open` gives None where nothing is written (option off, or another rank)."""

    def __init__(self, record: RunRecord, rank: int):
        # imported here: tensorboard takes seconds to import, and only runs that ask for it pay
        from torch.utils.tensorboard import SummaryWriter

        self.record, self.rank = record, rank
        self.writer = SummaryWriter(log_dir=str(record.path(FOLDER)))

    @classmethod
    def open(cls, config: TrainConfig, record: RunRecord, ranks: Ranks) -> EventLog | None:
        return cls(record, ranks.rank) if config.tensorboard and ranks.is_main else None

    def epoch(self, row: dict) -> None:
        """One epochs.csv row, as it is appended."""
        for column, value in scalars(row, {"epoch"}).items():
            self.writer.add_scalar(f"epoch/{column}", value, global_step=row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        """At the end, however the run ended: the rank's series and the test accuracy when they were written."""
        try:
            series = self.record.path(TELEMETRY) / f"rank{self.rank}.csv"
            for index, sample in enumerate(read_rank_rows(series) if series.exists() else []):
                for column, value in scalars(sample, NOT_SERIES).items():
                    self.writer.add_scalar(f"resources/{column}", value, global_step=index)
            summary = read_object(self.record.path(SUMMARY)) or {}
            if summary.get("test_accuracy") is not None:
                self.writer.add_scalar("summary/test_accuracy", summary["test_accuracy"], global_step=0)
        finally:
            self.writer.close()
