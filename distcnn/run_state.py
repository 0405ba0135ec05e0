"""What a run has done so far, typed: every field always present, checkpointed and restored here only.

RunState is the loop's (distcnn.trainer): epochs, best validation, patience, time, images, time to target,
resumes and restarts, divergence. A local phase (distcnn.strategies.local_phase) trains several local CNNs as
one model; each keeps its own LocalState (its best, patience and history, as it would alone) in `locals`.
A checkpoint holds `saved()`, a plain dict; `restored` reads one back, and a checkpoint written before a field
existed keeps that field's default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class Best:
    """The best validation accuracy so far, its epoch, and the epochs since (what patience counts)."""

    best_val_accuracy: float | None = None
    best_epoch: int | None = None
    stale_epochs: int = 0

    def note_validation(self, epoch: int, accuracy: float | None) -> bool:
        """The epoch's validation accuracy against the best so far; True when it is the new best."""
        improved = accuracy is not None and (self.best_val_accuracy is None or accuracy > self.best_val_accuracy)
        if improved:
            self.best_val_accuracy, self.best_epoch, self.stale_epochs = accuracy, epoch, 0
        else:
            self.stale_epochs += 1
        return improved


@dataclass
class LocalState(Best):
    """One local CNN of a local phase, as its own run would keep it."""

    stopped_at: int | None = None  # the epoch its patience ran out (after it, nothing counts)
    history: list[dict] = field(default_factory=list)
    diverged: dict | None = None


@dataclass
class RunState(Best):
    epoch: int = 0  # epochs finished
    train_seconds: float = 0.0
    wall_seconds: float = 0.0  # training + validation of every epoch so far
    images_seen: int = 0
    target: dict | None = None  # {epoch, seconds, images} where --target-accuracy was met
    history: list[dict] = field(default_factory=list)  # epochs.csv's rows
    resumed_at: list[int] = field(default_factory=list)  # epochs a resume started after
    restarts: list[dict] = field(default_factory=list)  # {restart, resumed_after_epoch} per torchrun restart
    diverged: dict | None = None  # where the loss was first not finite
    locals: list[LocalState] = field(default_factory=list)  # a local phase's local CNNs

    def saved(self) -> dict:
        return asdict(self)  # a deep copy: later epochs do not change what was saved

    @classmethod
    def restored(cls, saved: dict) -> RunState:
        values = {name: value for name, value in saved.items() if name in _names(cls)}
        values["locals"] = [LocalState(**{name: value for name, value in local.items() if name in _names(LocalState)})
                            for local in values.get("locals", [])]
        return cls(**values)

    def count_epoch(self, row: dict, images: int, seconds: float, diverged: dict | None) -> None:
        """The epoch's row in the history and its counts."""
        self.history.append(row)
        self.epoch, self.diverged = row["epoch"], diverged
        self.train_seconds += seconds
        self.wall_seconds += row["epoch_seconds"]
        self.images_seen += images

    def note_target(self, target: float | None, val_accuracy: float | None) -> bool:
        """Time to accuracy, the MLPerf way: the first epoch whose validation accuracy reaches the target, with
        the wall seconds (training + validation, checkpoints excluded) and images up to and including it (after
        the epoch is counted). True when this epoch is that one."""
        if target is None or self.target is not None or val_accuracy is None or val_accuracy < target:
            return False
        self.target = {"epoch": self.epoch, "seconds": self.wall_seconds, "images": self.images_seen}
        return True


def _names(kind: type) -> set[str]:
    """The fields a checkpoint may give back (one written before a field existed keeps its default)."""
    return {declared.name for declared in fields(kind)}
