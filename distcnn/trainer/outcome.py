"""What a run keeps of each epoch and leaves at its end: the part of a run the one training loop
(distcnn.trainer.loop.Trainer) is given, by what its model is, instead of being subclassed.

An outcome has the run's loss (`criterion`) and five steps the loop calls in order: `begin` (after compile),
then per epoch `epoch_figures` (its loss and validation for the epoch's row), `note` (best, patience,
target), `save` (what a resume needs; the checkpoint itself is the loop's), and, once, `finish` (test scores
and summary.json). `should_stop` ends the epochs early.

OneModel is the ordinary run: one model and its one run record. The local phase of a CNN-DNN has its own,
distcnn.strategies.local_phase.LocalCNNs: several local CNNs in one model, each with its own record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from torch import nn

from distcnn import comm
from distcnn.checkpoint import load_checkpoint, save_checkpoint
from distcnn.config import TrainConfig
from distcnn.console import loaded_line, say
from distcnn.errors import TrainingDiverged
from distcnn.parallel import world
from distcnn.parallel.ranks import Ranks
from distcnn.record import BEST
from distcnn.run_state import RunState
from distcnn.run_summary import Scores, build_summary, cost, final_line, progress, score

if TYPE_CHECKING:
    from distcnn.trainer.loop import Trainer

SummaryExtra = Callable[[nn.Module, RunState, Scores], dict]  # (trained model, state, scores) -> a strategy's


class Outcome(Protocol):
    criterion: nn.Module
    shown: Ranks | None  # the ranks whose rank 0 prints the epoch table (None: the run's)

    def begin(self, trainer: Trainer) -> None: ...

    def epoch_figures(self, trainer: Trainer, train_loss: float, images: int, diverged: dict | None) -> dict: ...

    def note(self, trainer: Trainer, row: dict) -> tuple[bool | list, str | None]:
        """The epoch counted: what improved (a truth value), and a line to print after the epoch's row."""

    def should_stop(self, trainer: Trainer) -> bool: ...

    def save(self, trainer: Trainer, improved: bool | list) -> None: ...

    def finish(self, trainer: Trainer) -> None: ...


class OneModel:
    """One model, one run record: validation accuracy, loss and top-5; best weights, patience and time to
    target; the best weights scored on the test set (and its shifted copies) at the end."""

    shown = None

    def __init__(self, config: TrainConfig, summary_extra: SummaryExtra | None = None):
        """`summary_extra(model, state, scores)`: what a strategy adds to the summary."""
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.summary_extra = summary_extra

    def begin(self, trainer: Trainer) -> None:
        ranks = trainer.ranks
        say(loaded_line(trainer.splits, trainer.config.model, ranks.world_size, ranks.device.type), ranks)

    def epoch_figures(self, trainer: Trainer, train_loss: float, images: int, diverged: dict | None) -> dict:
        val = trainer.scores(trainer.splits.val) if len(trainer.splits.val) and not diverged else {}
        return {"train_loss": train_loss, "val_accuracy": val.get("accuracy"), "val_loss": val.get("loss")} | (
            {"val_top5": val.get("top5")} if trainer.top5 else {})

    def note(self, trainer: Trainer, row: dict) -> tuple[bool, str | None]:
        c, state, accuracy = trainer.config, trainer.state, row["val_accuracy"]
        reached = state.note_target(c.target_accuracy, accuracy)
        improved = state.note_validation(row["epoch"], accuracy)
        news = (f"validation accuracy {accuracy:.4f} reached the target {c.target_accuracy} at epoch "
                f"{state.epoch} ({state.wall_seconds:.1f} s, {state.images_seen:,} images)") if reached else None
        return improved, news

    def should_stop(self, trainer: Trainer) -> bool:
        c, state = trainer.config, trainer.state
        if state.diverged or (c.stop_at_target and state.target is not None):
            return True
        return c.patience is not None and state.stale_epochs >= c.patience

    def save(self, trainer: Trainer, improved: bool) -> None:
        """Rank 0 writes the epoch's checkpoint, the best weights and epochs.csv, each atomically."""
        if not trainer.ranks.is_main:
            return
        if improved:
            save_checkpoint(trainer.record.path(BEST), {"model": trainer.model.state_dict(),
                                                        "epoch": trainer.state.epoch})
        trainer.save_checkpoint()
        trainer.record.write_epochs(trainer.state.history)
        if trainer.accounting.events is not None:
            trainer.accounting.events.epoch(trainer.state.history[-1])

    def finish(self, trainer: Trainer) -> None:
        """Score the best weights on the test set once, and write the summary (last: it marks the run done). A run
        that diverged is scored on nothing: its summary says where, then every rank raises TrainingDiverged."""
        c, state, ranks, diverged = trainer.config, trainer.state, trainer.ranks, trainer.state.diverged
        scores = Scores()
        if not diverged:
            weights = "the last weights"
            if state.best_epoch is not None:
                trainer.model.load_state_dict(load_checkpoint(trainer.record.path(BEST), ranks)["model"])
                weights = f"the best weights (epoch {state.best_epoch})"
            say(f"evaluating {weights} on {len(trainer.splits.test):,} test images"
                + (f" and shifted copies ({c.eval_shift})" if c.eval_shift else ""), ranks)
            scores = score(c, trainer.splits, trainer.evaluate)
        summary = build_summary(
            c, trainer.splits, ranks.device.type, ranks.world_size,
            progress(c, state, state.epoch, diverged, state),
            cost(trainer.params, trainer.flops_per_image, state, ranks.world_size,
                 comm.gradient_bytes(trainer.model), trainer.compile_seconds),
            scores.figures(), trainer.accounting.summary(state.history),  # (collective: every rank calls it)
            self.summary_extra(trainer.model, state, scores) if self.summary_extra is not None else {})
        if ranks.is_main:
            trainer.record.write_summary(summary)
        if not diverged:
            say(final_line(summary, trainer.record.dir), ranks)
        world.barrier(ranks)
        if diverged:
            raise TrainingDiverged.at(diverged, c.resolved_lr, trainer.record.dir)
