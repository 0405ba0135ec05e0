"""The one training loop of every run (1..N ranks, any strategy): epochs, evaluation, early stopping, time to
target, checkpoints; precision, memory format and compile (distcnn.speed); the DDP comm hook and bucket size.

A strategy (distcnn.strategies) runs it through `train_run`, passing what differs at construction: the
model to build for the loaded data, the data itself, and the run's outcome (distcnn.trainer.outcome: what it
keeps of each epoch and leaves at its end; by default one model's). Every run record gets its environment.json
from distcnn.trainer.setup.write_environment and its summary.json from distcnn.run_summary.build_summary.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from distcnn import comm, shifts, speed
from distcnn.checkpoint import load_checkpoint, save_checkpoint
from distcnn.config import TrainConfig
from distcnn.console import EpochTable, StepProgress, say
from distcnn.data import DataSplits
from distcnn.models import count_params, create_model, train_flops_per_image
from distcnn.parallel import world
from distcnn.parallel.ranks import Ranks
from distcnn.pipeline import EvalInputs, TrainInputs, eval_batch_size
from distcnn.record import CHECKPOINT, RunRecord
from distcnn.run_state import RunState
from distcnn.run_summary import achieved_flops
from distcnn.telemetry.accounting import Accounting
from distcnn.trainer.outcome import OneModel, Outcome
from distcnn.trainer.setup import build_optimizer, build_scheduler, data_parallel, load_splits, write_environment

BuildModel = Callable[[DataSplits], nn.Module]  # the network a run trains, for the data it loaded


@contextmanager
def accounted(config: TrainConfig, record: RunRecord, ranks: Ranks) -> Iterator[Accounting]:
    """A run record's accounting, started now (its setup phase covers what comes before the loop) and stopped
    at the end, however it ends."""
    accounting = Accounting(config, record, ranks)
    try:
        yield accounting
    finally:
        accounting.stop()


def train_run(config: TrainConfig, record: RunRecord, ranks: Ranks, build_model: BuildModel | None = None,
              splits: DataSplits | None = None, outcome: Outcome | None = None) -> None:
    """Train one run record on these ranks, accounted: the config's model, or `build_model`'s."""
    with accounted(config, record, ranks) as accounting:
        Trainer(config, record, ranks, accounting, build_model=build_model, splits=splits, outcome=outcome).fit()


def seed_for(config: TrainConfig, epoch: int, rank: int) -> int:
    """A seed per (epoch, rank): augmentation differs across ranks, and a resumed epoch replays exactly."""
    return (config.seed * 1_000_003 + epoch * 10_007 + rank) % (2**63)


class Trainer:
    """One run on one rank: the model, its optimiser and schedule, and the epoch loop."""

    def __init__(self, config: TrainConfig, record: RunRecord, ranks: Ranks, accounting: Accounting,
                 build_model: BuildModel | None = None, splits: DataSplits | None = None,
                 outcome: Outcome | None = None):
        """`build_model(splits) -> nn.Module` replaces the config's model (a local CNN, a CNN-DNN): any
        network that takes whole images trains through the same loop. `splits`: the data when the strategy has
        loaded it already. `outcome`: what the run keeps of its epochs and leaves at its end (OneModel's)."""
        self.config, self.record, self.ranks, self.accounting = config, record, ranks, accounting
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        splits = self.splits = splits if splits is not None else load_splits(config)
        model = (build_model(splits) if build_model is not None else create_model(
            config.model, in_chans=splits.channels, num_classes=splits.num_classes, width=config.width))
        self.layout = speed.resolve_layout(config.memory_format, ranks.device.type, config.precision)
        self.memory_format = speed.torch_format(self.layout)
        self.model = model.to(ranks.device, memory_format=self.memory_format)
        self.precision = speed.Precision(config.precision, ranks.device)
        self.outcome = outcome if outcome is not None else OneModel(config)
        self.criterion = self.outcome.criterion
        self.params = count_params(self.model)
        # rank 0 alone writes the record: the others spare the count (a forward and backward under a dispatch mode)
        self.flops_per_image = (train_flops_per_image(self.model, splits.channels, splits.image_size)
                                if ranks.is_main else None)
        self.inputs = TrainInputs(splits, config, ranks, self.memory_format)
        self.eval_batch = eval_batch_size(config.batch_size, splits.channels, splits.image_size)
        self.steps_per_epoch = len(self.inputs)
        self.optimizer = build_optimizer(self.model, config, ranks.device.type)
        self.scheduler = build_scheduler(self.optimizer, config, self.steps_per_epoch)
        self.top5 = splits.num_classes > 5  # top-5 accuracy says something only with more than 5 classes
        self.state = RunState()
        self._resume()
        self._note_restart()
        self.ddp = self.model
        if ranks.distributed:
            self.ddp = data_parallel(self.model, config, ranks)
            # the run's comm hook, wrapped so that its bytes are counted when accounting is on
            counter = comm.register(self.ddp, config.comm_hook, count=accounting.enabled,
                                    powersgd_rank=config.powersgd_rank)
            accounting.attach(self.ddp, counter)
        self.step_model = speed.compile_model(self.ddp, config.compile)  # what the step calls
        accounting.watch_gradients(self.model, self.steps_per_epoch)
        self.compile_seconds: float | None = None

    def _resume(self) -> None:
        """Continue from the last checkpoint when there is one (--resume, or a torchrun restart)."""
        if not world.broadcast_flag(self.record.has_checkpoint, self.ranks):  # rank 0's file decides
            return
        checkpoint = load_checkpoint(self.record.path(CHECKPOINT), self.ranks)
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.precision.load_state_dict(checkpoint.get("scaler"))
        self.state = RunState.restored(checkpoint["state"])
        self.state.resumed_at.append(self.state.epoch)
        say(f"resuming {self.record.dir} after epoch {self.state.epoch}", self.ranks)

    def _note_restart(self) -> None:
        """A run restarted by torchrun (--max-restarts) records it: which restart, from which epoch on."""
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        if restart and self.ranks.is_main:
            self.state.restarts.append({"restart": restart, "resumed_after_epoch": self.state.epoch})
            say(f"restart {restart}: continuing after epoch {self.state.epoch}", self.ranks)

    def fit(self) -> None:
        c, ranks, state, outcome = self.config, self.ranks, self.state, self.outcome
        write_environment(c, self.record, ranks)
        compile_warmup(self)
        outcome.begin(self)
        table = EpochTable(outcome.shown or ranks)
        while state.epoch < c.epochs and not outcome.should_stop(self):
            epoch = state.epoch
            train_loss, images, seconds, diverged = self._train_epoch(epoch)
            accounting = self.accounting.end_epoch(epoch)
            eval_start = time.perf_counter()
            figures = outcome.epoch_figures(self, train_loss, images, diverged)
            eval_seconds = time.perf_counter() - eval_start
            row = {"epoch": epoch + 1} | figures | {
                   "images_per_second": images / seconds, "train_seconds": seconds,
                   "eval_seconds": eval_seconds, "epoch_seconds": seconds + eval_seconds,
                   "lr": self.optimizer.param_groups[0]["lr"],
                   "achieved_flops_per_s": achieved_flops(self.flops_per_image, images, ranks.world_size, seconds),
                   } | accounting
            state.count_epoch(row, images, seconds, diverged)
            world.note_epoch(c, ranks, max(past["epoch_seconds"] for past in state.history))
            improved, news = outcome.note(self, row)
            outcome.save(self, improved)
            table.row(row, bool(improved))
            if news:
                say(news, ranks)
        outcome.finish(self)

    def step_begin(self) -> None:
        """reduce-overhead: a new step begins, so the CUDA graphs may reuse the last step's output memory."""
        if self.config.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()

    def _train_epoch(self, epoch: int) -> tuple[float, int, float, dict | None]:
        """Train one epoch; returns (mean loss over all ranks, images over all ranks, wall seconds, diverged_at: where
        the loss was first not finite on any rank, or None). Kept on the device, read once at the epoch's end."""
        torch.manual_seed(seed_for(self.config, epoch, self.ranks.rank))
        self.inputs.set_epoch(epoch)
        self.ddp.train()
        loss_sum = torch.zeros((), device=self.ranks.device)
        first_bad, bad_loss = loss_sum + math.inf, loss_sum.clone()  # the first step with a loss not finite, that loss
        images = 0
        progress = StepProgress(self.ranks, f"epoch {epoch + 1}/{self.config.epochs}", self.steps_per_epoch,
                                self.accounting.live)
        timer = self.accounting.timer
        self.optimizer.zero_grad(set_to_none=True)
        self.accounting.begin_epoch(epoch)  # the timer's first phase starts here
        self.sync()
        start = time.perf_counter()
        with progress:
            for step, (raw_images, raw_labels) in enumerate(self.inputs):
                timer.mark("data_wait")
                x, targets = self.inputs.prepare(raw_images, raw_labels)
                timer.mark("augmentation")
                self.step_begin()
                with self.precision.autocast():
                    loss = self.criterion(self.step_model(x), targets)
                timer.mark("forward")
                self.accounting.before_backward()
                self.precision.backward(loss)
                self.accounting.after_backward()
                timer.mark("backward")
                self.precision.step(self.optimizer)
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach() * x.shape[0]
                first_bad = torch.where(loss.detach().isfinite(), first_bad, first_bad.clamp(max=step))
                bad_loss = torch.where(first_bad == step, loss.detach(), bad_loss)
                images += x.shape[0]
                progress.advance(step, loss, images, time.perf_counter() - start)
                timer.mark("optimizer")
                self.accounting.end_step()
            self.sync()
            seconds = time.perf_counter() - start
        total_loss, total_images, diverging = world.all_reduce_sum(
            [loss_sum.item(), float(images), float(first_bad.isfinite())], self.ranks)
        seconds = world.all_reduce_max(seconds, self.ranks)
        at = None
        if diverging:  # the same sum on every rank, so all take part in the gather; the first step of any rank counts
            step, loss = min(world.gather((first_bad.item() + 1, bad_loss.item()), self.ranks))
            at = {"epoch": epoch + 1, "step": int(step), "global_step": epoch * self.steps_per_epoch + int(step),
                  "loss": str(loss)}
        return total_loss / max(1.0, total_images), int(total_images), seconds, at

    def sync(self) -> None:
        """Wait for the device's queued work (a GPU's), so that a clock read after it times the work."""
        if self.ranks.device.type == "cuda":
            torch.cuda.synchronize(self.ranks.device)

    def evaluate(self, images, shift: shifts.Shift | None = None) -> float:
        return self.scores(images, shift)["accuracy"]

    @torch.inference_mode()
    def scores(self, images, shift: shifts.Shift | None = None) -> dict[str, float | None]:
        """Accuracy, mean cross-entropy and (over 5 classes) top-5 accuracy over a whole split (optionally
        shifted): each rank scores its shard in large batches, at the run's precision, counting on the device
        (one read at the end); the counts are summed over ranks."""
        self.model.eval()
        counts = torch.zeros(3, dtype=torch.float64, device=self.ranks.device)  # correct, top-5 correct, loss sum
        total = 0
        inputs = EvalInputs(images, self.splits.mean, self.splits.std, self.eval_batch, self.ranks, shift,
                            self.memory_format)
        with self.precision.autocast():
            for x, labels in inputs:
                logits = self.model(x).float()
                counts[0] += (logits.argmax(dim=1) == labels).sum()
                if self.top5:
                    counts[1] += (logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1).sum()
                counts[2] += nn.functional.cross_entropy(logits, labels, reduction="sum")
                total += labels.numel()
        correct, top5, loss, total = world.all_reduce_sum([*counts.tolist(), float(total)], self.ranks)
        if not total:
            return {"accuracy": math.nan, "top5": None, "loss": None}
        return {"accuracy": correct / total, "top5": top5 / total if self.top5 else None, "loss": loss / total}

    def save_checkpoint(self) -> None:
        """What a resumed run or a torchrun restart continues from; weights that are not finite are no start."""
        if not self.state.diverged:
            save_checkpoint(self.record.path(CHECKPOINT), {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.precision.state_dict(),
                "state": self.state.saved()})


def compile_warmup(trainer: Trainer) -> None:
    """Compile the step's model before the first epoch, on a batch of the training shape, so that compilation
    is timed on its own (compile_seconds) and not inside epoch 1. The warm-up changes nothing: its gradients
    are dropped, its communicated bytes are not counted, BatchNorm's running statistics are restored, and it
    draws no random numbers before the epoch seeds its generator. reduce-overhead also records its CUDA
    graphs here (they are recorded on a later call than the first)."""
    if trainer.config.compile == "off":
        return
    saved = [buffer.clone() for buffer in trainer.model.buffers()]
    x = torch.zeros(trainer.inputs.batch_shape, device=trainer.ranks.device)
    x = x.contiguous(memory_format=trainer.memory_format)
    targets = torch.zeros(x.shape[0], dtype=torch.long, device=trainer.ranks.device)
    trainer.step_model.train()
    trainer.sync()
    start = time.perf_counter()
    for _ in range(3 if trainer.config.compile == "reduce-overhead" else 1):
        trainer.step_begin()
        with trainer.precision.autocast():
            loss = trainer.criterion(trainer.step_model(x), targets)
        loss.backward()
        trainer.optimizer.zero_grad(set_to_none=True)
    trainer.sync()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for buffer, value in zip(trainer.model.buffers(), saved):
            buffer.copy_(value)
    if trainer.accounting.counter is not None:
        trainer.accounting.counter.take()
    trainer.compile_seconds = world.all_reduce_max(seconds, trainer.ranks)
    say(f"compiled the model ({trainer.config.compile}) in {trainer.compile_seconds:.1f} s", trainer.ranks)
