"""The local phase of an independent CNN-DNN on one rank: its local CNNs trained together, as one model.

The rank's local CNNs (dealt round-robin) are one StackedLocals module, trained by the one loop
(distcnn.trainer.Trainer) with LocalCNNs as its outcome: one batch gather, one augmentation, one forward and
backward of all of them, one optimizer step. Each local CNN still trains exactly as it would alone — its own
mean cross-entropy (SummedLoss adds them; their parameters are disjoint, so each gradient is its own),
per-parameter optimizer state and weight decay (biases and norm scales undecayed, as alone), the same schedule,
the same batches and augmentation (the run's seed), the same initial weights (the run's seed before each is
built) — and keeps its own validation accuracy, best weights, patience and run record in RUN_DIR/local/kNN/
(epochs.csv, best.pt, summary.json). A local CNN whose patience ran out stops counting: its best weights are
chosen among the epochs it would have trained alone (it keeps training with the others, unused). The phase
itself (checkpoint, telemetry) is RUN_DIR/local/rankR/.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from distcnn import comm
from distcnn.checkpoint import load_checkpoint, save_checkpoint
from distcnn.config import TrainConfig
from distcnn.decomposition.models import SummedLoss
from distcnn.errors import TrainingDiverged
from distcnn.models import count_params, train_flops_per_image
from distcnn.parallel.ranks import Ranks
from distcnn.pipeline import EvalInputs
from distcnn.record import BEST, RunRecord
from distcnn.run_state import LocalState
from distcnn.run_summary import Scores, build_summary, cost, progress

if TYPE_CHECKING:
    from distcnn.trainer import Trainer

# the phase's resource figures each local CNN's summary repeats (they trained on the same cores at once); its
# other accounting figures are the phase's, not one local CNN's, and are null in a local CNN's summary
SHARED_FIGURES = ("cpu_percent_mean", "process_cpu_percent_mean", "mem_percent_mean", "net_packets_per_s_mean")


class LocalCNNs:
    """The outcome of one rank's local CNNs `indices`, trained together on this rank alone (no gradient
    traffic): one LocalState (run_state) and one run record per local CNN."""

    def __init__(self, config: TrainConfig, records: list[RunRecord], indices: list[int], shown: Ranks):
        """`records`: each local CNN's; `shown`: the job's ranks, so that one rank of the job prints the table."""
        self.records, self.indices, self.shown = records, indices, shown
        self.criterion = SummedLoss(config.label_smoothing)
        self.losses: list[float] = []
        self.val: list[float | None] = []

    def begin(self, trainer: Trainer) -> None:
        if not trainer.state.locals:  # (a resumed phase has them from its checkpoint)
            trainer.state.locals = [LocalState() for _ in self.indices]
        self.criterion.take()  # the compile warm-up's loss is no epoch's

    def epoch_figures(self, trainer: Trainer, train_loss: float, images: int, diverged: dict | None) -> dict:
        self.losses = (self.criterion.take() / max(1, images)).tolist()
        self.val = (self.evaluate(trainer, trainer.splits.val) if len(trainer.splits.val) and not diverged
                    else [None] * len(self.indices))
        scored = [v for v in self.val if v is not None]
        return {"train_loss": train_loss / len(self.indices),
                "val_accuracy": sum(scored) / len(scored) if scored else None}

    def note(self, trainer: Trainer, row: dict) -> tuple[list[int], None]:
        """Each local CNN's epoch, best and patience, as its own run would keep them; the positions improved."""
        improved, patience, epoch, diverged = [], trainer.config.patience, row["epoch"], trainer.state.diverged
        first_bad = next((i for i, loss in enumerate(self.losses) if not math.isfinite(loss)), 0)
        for i, local in enumerate(trainer.state.locals):
            if local.stopped_at is not None:
                continue  # alone it would have stopped: nothing after counts
            local.history.append({key: row[key] for key in ("epoch", "train_seconds", "eval_seconds", "lr")}
                                 | {"train_loss": self.losses[i], "val_accuracy": self.val[i]})
            if diverged is not None and i == first_bad:
                local.diverged = diverged
            if local.note_validation(epoch, self.val[i]):
                improved.append(i)
            if patience is not None and local.stale_epochs >= patience:
                local.stopped_at = epoch
        return improved, None

    def should_stop(self, trainer: Trainer) -> bool:
        state = trainer.state
        return state.diverged is not None or all(local.stopped_at is not None for local in state.locals)

    def save(self, trainer: Trainer, improved: list[int]) -> None:
        """The phase's checkpoint and epochs; each local CNN's best weights (when it improved) and epochs."""
        state = trainer.state
        for i in improved:
            save_checkpoint(self.records[i].path(BEST),
                            {"model": trainer.model.locals[i].state_dict(), "epoch": state.epoch})
        trainer.save_checkpoint()
        trainer.record.write_epochs(state.history)
        for record, local in zip(self.records, state.locals):
            record.write_epochs(local.history)

    @torch.inference_mode()
    def evaluate(self, trainer: Trainer, images) -> list[float]:
        """Every local CNN's accuracy on a split, in one pass of large batches, counted on the device."""
        trainer.model.eval()
        correct = torch.zeros(len(self.indices), dtype=torch.long, device=trainer.ranks.device)
        total = 0
        inputs = EvalInputs(images, trainer.splits.mean, trainer.splits.std, trainer.eval_batch, trainer.ranks,
                            None, trainer.memory_format)
        with trainer.precision.autocast():
            for x, labels in inputs:
                correct += (trainer.model(x).argmax(dim=1) == labels[:, None]).sum(dim=0)
                total += labels.numel()
        return [count / total if total else math.nan for count in correct.tolist()]

    def finish(self, trainer: Trainer) -> None:
        """Score each local CNN's best weights on the test set (one pass for all) and write its summary; a phase
        that diverged scores nothing and raises TrainingDiverged (the local CNN whose loss went first named)."""
        state, diverged, cnns = trainer.state, trainer.state.diverged, trainer.model.locals
        accuracies: list[float | None] = [None] * len(self.indices)
        if not diverged:
            for cnn, record, local in zip(cnns, self.records, state.locals):
                if local.best_epoch is not None:
                    cnn.load_state_dict(load_checkpoint(record.path(BEST))["model"])
            accuracies = self.evaluate(trainer, trainer.splits.test)
        # the phase's accounting; what a local CNN shares of it (it trained on the same cores at once)
        shared = {figure: value if figure in SHARED_FIGURES else None
                  for figure, value in trainer.accounting.summary(state.history).items()}
        for i, (cnn, record, local) in enumerate(zip(cnns, self.records, state.locals)):
            c, splits = trainer.config, trainer.splits
            record.write_summary(build_summary(
                c, splits, trainer.ranks.device.type, 1,
                # its own epochs, validation and divergence; the phase's seconds, images and resumes
                progress(c, local, len(local.history), local.diverged, state),
                cost(count_params(cnn), train_flops_per_image(cnn, splits.channels, splits.image_size), state, 1,
                     comm.gradient_bytes(cnn), trainer.compile_seconds),
                Scores(accuracies[i]).figures(), shared,
                {"name": f"{c.run_name}-k{self.indices[i]:02d}", "comm_bytes_total": 0,
                 "target_accuracy": None}))  # (the local phase keeps no time to target)
        if diverged:
            local = next((k for k, local in zip(self.indices, state.locals) if local.diverged), self.indices[0])
            raise TrainingDiverged.at(diverged | {"local_cnn": local}, trainer.config.resolved_lr, trainer.record.dir)
