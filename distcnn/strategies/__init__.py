"""How a run trains on its ranks, picked by name (`--strategy`) like a model: `ddp` (one model, data-parallel)
and `dd` (the CNN-DNN of domain decomposition). Each is an object with one small interface, registered with
`@register_strategy`; the launcher asks `get_strategy(config.strategy)` for it and runs it on every rank.

A strategy uses the one training loop (distcnn.trainer.Trainer) with what it needs passed at construction:
the model to build, the data, and the run's outcome (distcnn.trainer.outcome: one model's, with what the
strategy adds to its summary, or a local phase's local CNNs).
"""

from __future__ import annotations

from typing import Protocol

from distcnn.config import TrainConfig
from distcnn.data import DataSplits
from distcnn.parallel.ranks import Ranks
from distcnn.record import RunRecord


class Strategy(Protocol):
    name: str  # the value of --strategy

    def validate(self, config: TrainConfig, splits: DataSplits) -> None:
        """Raise UsageError for what this strategy cannot run, before anything is written or started."""

    def run(self, config: TrainConfig, record: RunRecord, ranks: Ranks) -> None:
        """Train the run on this rank (collective: every rank of the job calls it) and write its record."""


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
    if strategy.name in STRATEGIES:
        raise ValueError(f"strategy {strategy.name!r} is registered twice")
    STRATEGIES[strategy.name] = strategy
    return strategy


def get_strategy(name: str) -> Strategy:
    """The strategy registered as `name` (the config's Literal admits only registered names)."""
    return STRATEGIES[name]


from distcnn.strategies import dd, ddp  # noqa: E402,F401 — each module registers its strategy
