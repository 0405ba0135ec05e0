"""The local phase of an independent CNN-DNN on one rank: its local CNNs trained together, as one model.

The rank's local CNNs (dealt round-robin) are one StackedLocals module, trained by the ordinary loop: one batch
gather, one augmentation, one forward and backward of all of them, one optimizer step. Each local CNN still
trains exactly as it would alone — its own mean cross-entropy (SummedLoss adds them; their parameters are
disjoint, so each gradient is its own), per-parameter optimizer state and weight decay (biases and norm scales
undecayed, as alone), the same schedule, the same batches and augmentation (the run's seed), the same initial
weights (the run's seed before each is built) — and keeps its own validation accuracy, best weights, patience
and run record in RUN_DIR/local/kNN/ (epochs.csv, best.pt, summary.json). A local CNN whose patience ran out
stops counting: its best weights are chosen among the epochs it would have trained alone (it keeps training
with the others, unused). The phase itself (checkpoint, telemetry) is RUN_DIR/local/rankR/.
"""

from __future__ import annotations

import math
import time

import torch

from distcnn import summary as declared
from distcnn.checkpoint import load_checkpoint, save_checkpoint
from distcnn.config import TrainConfig
from distcnn.console import EpochTable
from distcnn.data import DataSplits
from distcnn.decomposition.models import StackedLocals, SummedLoss, build_local
from distcnn.decomposition.subimages import Layout
from distcnn.errors import TrainingDiverged
from distcnn.models import count_params, train_flops_per_image
from distcnn.parallel.ranks import Ranks
from distcnn.pipeline import EvalInputs
from distcnn.record import BEST, RunRecord
from distcnn.run_state import LocalState
from distcnn.telemetry.accounting import Accounting
from distcnn.trainer import Trainer, write_environment

# the phase's resource figures each local CNN's summary repeats (they trained on the same cores at once)
SHARED_FIGURES = ("cpu_percent_mean", "process_cpu_percent_mean", "mem_percent_mean", "net_packets_per_s_mean")


class LocalPhase(Trainer):
    """One rank's local CNNs `indices`, trained together on this rank alone (no gradient traffic)."""

    def __init__(self, config: TrainConfig, phase: RunRecord, locals_: list[RunRecord], ranks: Ranks,
                 accounting: Accounting, splits: DataSplits, layout: Layout, indices: list[int], shown: Ranks):
        """`phase`: the phase's own record; `locals_`: each local CNN's; `shown`: the job's ranks, so that one
        rank of the job prints the epoch table."""
        self.indices, self.local_records, self.shown = indices, locals_, shown

        def build(data: DataSplits) -> StackedLocals:
            cnns = []
            for index in indices:
                torch.manual_seed(config.seed)  # each local CNN starts from the weights it would have alone
                cnns.append(build_local(config.model, data.channels, data.num_classes, layout, index, config.width,
                                        config.local_width))
            return StackedLocals(cnns)

        super().__init__(config, phase, ranks, accounting, build_model=build, splits=splits)
        self.criterion = SummedLoss(config.label_smoothing)
        self.local_params = [count_params(cnn) for cnn in self.model.locals]
        self.local_flops = [train_flops_per_image(cnn, splits.channels, splits.image_size) for cnn in self.model.locals]

    def _resume(self) -> None:
        self.state.locals = [LocalState() for _ in self.indices]
        super()._resume()

    def _should_stop(self) -> bool:
        return self.state.diverged is not None or all(
            local.stopped_at is not None for local in self.state.locals)

    def fit(self) -> None:
        c, state = self.config, self.state
        write_environment(c, self.record, self.ranks)
        self._compile()
        self.criterion.take()  # the compile warm-up's loss is no epoch's
        table = EpochTable(self.shown)
        while state.epoch < c.epochs and not self._should_stop():
            epoch = state.epoch
            train_loss, images, seconds, diverged = self._train_epoch(epoch)
            local_losses = (self.criterion.take() / max(1, images)).tolist()
            accounting = self.accounting.end_epoch(epoch)
            eval_start = time.perf_counter()
            val = (self.evaluate_locals(self.splits.val) if len(self.splits.val) and not diverged
                   else [None] * len(self.indices))
            eval_seconds = time.perf_counter() - eval_start
            scored = [v for v in val if v is not None]
            row = {"epoch": epoch + 1, "train_loss": train_loss / len(self.indices),
                   "val_accuracy": sum(scored) / len(scored) if scored else None,
                   "images_per_second": images / seconds, "train_seconds": seconds, "eval_seconds": eval_seconds,
                   "epoch_seconds": seconds + eval_seconds, "lr": self.optimizer.param_groups[0]["lr"],
                   "achieved_flops_per_s": self.flops_per_image * images / seconds} | accounting
            state.count_epoch(row, images, seconds, diverged)
            improved = self._note_locals(row, local_losses, val, diverged)
            self._save(improved)
            table.row(row, bool(improved))
        self._finish()

    def _note_locals(self, row: dict, losses: list[float], val: list[float | None], diverged: dict | None) -> list[int]:
        """Each local CNN's epoch, best and patience, as its own run would keep them; the positions improved."""
        improved, patience, epoch = [], self.config.patience, row["epoch"]
        first_bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), 0)
        for i, local in enumerate(self.state.locals):
            if local.stopped_at is not None:
                continue  # alone it would have stopped: nothing after counts
            local.history.append({key: row[key] for key in ("epoch", "train_seconds", "eval_seconds", "lr")}
                                 | {"train_loss": losses[i], "val_accuracy": val[i]})
            if diverged is not None and i == first_bad:
                local.diverged = diverged
            if local.note_validation(epoch, val[i]):
                improved.append(i)
            if patience is not None and local.stale_epochs >= patience:
                local.stopped_at = epoch
        return improved

    @torch.inference_mode()
    def evaluate_locals(self, images) -> list[float]:
        """Every local CNN's accuracy on a split, in one pass of large batches, counted on the device."""
        self.model.eval()
        correct = torch.zeros(len(self.indices), dtype=torch.long, device=self.ranks.device)
        total = 0
        inputs = EvalInputs(images, self.splits.mean, self.splits.std, self.eval_batch, self.ranks, None,
                            self.memory_format)
        with self.precision.autocast():
            for x, labels in inputs:
                correct += (self.model(x).argmax(dim=1) == labels[:, None]).sum(dim=0)
                total += labels.numel()
        return [count / total if total else math.nan for count in correct.tolist()]

    def _save(self, improved: list[int]) -> None:
        """The phase's checkpoint and epochs; each local CNN's best weights (when it improved) and epochs."""
        state = self.state
        for i in improved:
            save_checkpoint(self.local_records[i].path(BEST),
                            {"model": self.model.locals[i].state_dict(), "epoch": state.epoch})
        self._save_checkpoint()
        self.record.write_epochs(state.history)
        for record, local in zip(self.local_records, state.locals):
            record.write_epochs(local.history)

    def _finish(self) -> None:
        """Score each local CNN's best weights on the test set (one pass for all) and write its summary; a phase
        that diverged scores nothing and raises TrainingDiverged (the local CNN whose loss went first named)."""
        state, diverged = self.state, self.state.diverged
        accuracies: list[float | None] = [None] * len(self.indices)
        if not diverged:
            for i, (record, local) in enumerate(zip(self.local_records, state.locals)):
                if local.best_epoch is not None:
                    self.model.locals[i].load_state_dict(load_checkpoint(record.path(BEST))["model"])
            accuracies = self.evaluate_locals(self.splits.test)
        shared = self.accounting.summary(state.history)
        for i, record in enumerate(self.local_records):
            record.write_summary(self.local_summary(i, accuracies[i], shared))
        if diverged:
            local = next((k for k, local in zip(self.indices, state.locals) if local.diverged), self.indices[0])
            raise TrainingDiverged.at(diverged | {"local_cnn": local}, self.config.resolved_lr, self.record.dir)

    def local_summary(self, i: int, test_accuracy: float | None, shared: dict) -> dict:
        """Local CNN i's summary.json: its own accuracy, epochs, parameters and FLOPs; the phase's seconds and
        resources, which it shared with the local CNNs trained beside it."""
        c, state, local = self.config, self.state, self.state.locals[i]
        return declared.checked({
            "name": f"{c.run_name}-k{self.indices[i]:02d}", "model": c.model, "policy": c.policy,
            "aug_backend": c.aug_backend, "data": self.splits.name, "world_size": 1,
            "test_accuracy": test_accuracy, "best_val_accuracy": local.best_val_accuracy,
            "best_epoch": local.best_epoch, "epochs_run": len(local.history),
            "stopped_early": len(local.history) < c.epochs, "diverged": local.diverged is not None,
            "diverged_at": local.diverged, "train_seconds": state.train_seconds,
            "images_seen": state.images_seen, "params": self.local_params[i],
            "train_flops_per_image": self.local_flops[i], "comm_bytes_total": 0,
            "train_images": len(self.splits.train), "val_images": len(self.splits.val),
            "test_images": len(self.splits.test), "resumed_at_epochs": state.resumed_at,
            "bucket_cap_mb": c.bucket_cap_mb,
        } | {figure: shared.get(figure) for figure in SHARED_FIGURES})
