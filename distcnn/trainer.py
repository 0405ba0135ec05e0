"""The one training loop of every run (1..N ranks, any strategy): epochs, evaluation, early stopping, time to
target, checkpoints; precision, memory format and compile (distcnn.speed); the DDP comm hook and bucket size.

A strategy (distcnn.strategies) runs it through `train_run`, passing what differs as data at construction: the
model to build for the loaded data, the data itself, and what it adds to the summary. Every run record gets its
environment.json from `write_environment`; a run the loop trains gets its summary.json from
distcnn.run_summary (the one other summary, an independent CNN-DNN's, is built from its local runs' by
strategies.dd.independent_summary).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distcnn import comm, shifts, speed
from distcnn.checkpoint import load_checkpoint, save_checkpoint
from distcnn.config import TrainConfig
from distcnn.console import EpochTable, StepProgress, loaded_line, say
from distcnn.data import DataSplits, load_data
from distcnn.errors import TrainingDiverged
from distcnn.models import count_params, create_model, train_flops_per_image
from distcnn.parallel import world
from distcnn.parallel.ranks import Ranks
from distcnn.pipeline import EvalInputs, TrainInputs, eval_batch_size
from distcnn.record import BEST, CHECKPOINT, RunRecord, describe_environment
from distcnn.run_state import RunState
from distcnn.run_summary import evaluate_shifts, final_line, run_summary, speed_options
from distcnn.telemetry.accounting import Accounting

DATA_OPTIONS = ("data", "data_dir", "image_size", "train_subset", "val_fraction", "test_fraction", "split_seed",
                "download")

BuildModel = Callable[[DataSplits], nn.Module]  # the network a run trains, for the data it loaded
SummaryExtra = Callable[[nn.Module, dict], dict]  # (trained model, the loop's summary) -> what a strategy adds


def load_splits(config: TrainConfig) -> DataSplits:
    data, *options = DATA_OPTIONS  # load_data's keywords carry the options' own names
    return load_data(getattr(config, data), **{name: getattr(config, name) for name in options})


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
              splits: DataSplits | None = None) -> None:
    """Train one run record on these ranks, accounted: the config's model, or `build_model`'s."""
    with accounted(config, record, ranks) as accounting:
        Trainer(config, record, ranks, accounting, build_model=build_model, splits=splits).fit()


def write_environment(config: TrainConfig, record: RunRecord, ranks: Ranks) -> None:
    """The one writer of environment.json (collective: every rank calls it; rank 0 writes): the ranks, their
    hosts, threads, device, backend and speed options of a run record."""
    hosts = world.gather_hosts(ranks)
    if ranks.is_main:
        record.write_environment(describe_environment(
            ranks.world_size, ranks.local_world_size, torch.get_num_threads(), str(ranks.device),
            ranks.backend or "none") | {"hosts": hosts} | speed_options(config, ranks))


def build_optimizer(model: nn.Module, config: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no decay on biases and norm scales
    groups = [{"params": decay, "weight_decay": config.resolved_weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # On a GPU the fused update is one kernel for all parameters, and with fp16 it reads the scaler's
    # overflow flag on the device (no host sync per step); on the CPU the default (foreach) update.
    fused = {"fused": True} if device_type == "cuda" else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.resolved_lr, momentum=config.momentum,
                               nesterov=config.momentum > 0, **fused)
    return torch.optim.AdamW(groups, lr=config.resolved_lr, **fused)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(1, config.epochs * steps_per_epoch)
    if config.schedule == "onecycle" and total >= 3:
        # a warm-up of at least two steps: torch's OneCycleLR divides by zero when it would last one (4 steps)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.resolved_lr, total_steps=total,
                                                   pct_start=max(0.25, 2 / total))
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)


def data_parallel(model: nn.Module, config: TrainConfig, ranks: Ranks) -> DistributedDataParallel:
    """The model wrapped in DDP, one device per rank. --bucket-cap-mb is passed only when given: DDP's own
    default is not "25" but 25 MB with a smaller 1 MB first bucket, which an explicit size would replace."""
    ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    buckets = {} if config.bucket_cap_mb is None else {"bucket_cap_mb": config.bucket_cap_mb}
    return DistributedDataParallel(model, device_ids=ids, **buckets)


def seed_for(config: TrainConfig, epoch: int, rank: int) -> int:
    """A seed per (epoch, rank): augmentation differs across ranks, and a resumed epoch replays exactly."""
    return (config.seed * 1_000_003 + epoch * 10_007 + rank) % (2**63)


class Trainer:
    """One run on one rank: the model, its optimiser and schedule, and the epoch loop."""

    def __init__(self, config: TrainConfig, record: RunRecord, ranks: Ranks, accounting: Accounting,
                 build_model: BuildModel | None = None, splits: DataSplits | None = None,
                 summary_extra: SummaryExtra | None = None):
        """`build_model(splits) -> nn.Module` replaces the config's model (a local CNN, a CNN-DNN): any
        network that takes whole images trains through the same loop. `summary_extra(model, summary)`: what a
        strategy adds to the run's summary. `splits`: the data when the strategy has loaded it already."""
        self.config, self.record, self.ranks, self.accounting = config, record, ranks, accounting
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        splits = self.splits = splits if splits is not None else load_splits(config)
        model = (build_model(splits) if build_model is not None else create_model(
            config.model, in_chans=splits.channels, num_classes=splits.num_classes, width=config.width))
        self.layout = speed.resolve_layout(config.memory_format, ranks.device.type, config.precision)
        self.memory_format = speed.torch_format(self.layout)
        self.model = model.to(ranks.device, memory_format=self.memory_format)
        self.precision = speed.Precision(config.precision, ranks.device)
        self.summary_extra = summary_extra
        self.params = count_params(self.model)
        self.flops_per_image = train_flops_per_image(self.model, splits.channels, splits.image_size)
        self.inputs = TrainInputs(splits, config, ranks, self.memory_format)
        self.eval_batch = eval_batch_size(config.batch_size, splits.channels, splits.image_size)
        self.steps_per_epoch = len(self.inputs)
        self.optimizer = build_optimizer(self.model, config, ranks.device.type)
        self.scheduler = build_scheduler(self.optimizer, config, self.steps_per_epoch)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
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
        c, ranks, state = self.config, self.ranks, self.state
        write_environment(c, self.record, ranks)
        self._compile()
        say(loaded_line(self.splits, c.model, ranks.world_size, ranks.device.type), ranks)
        table = EpochTable(ranks)
        while state.epoch < c.epochs and not self._should_stop():
            epoch = state.epoch
            train_loss, images, seconds, diverged = self._train_epoch(epoch)
            accounting = self.accounting.end_epoch(epoch)
            eval_start = time.perf_counter()
            val = self.scores(self.splits.val) if len(self.splits.val) and not diverged else {}
            val_accuracy = val.get("accuracy")
            eval_seconds = time.perf_counter() - eval_start
            row = {"epoch": epoch + 1, "train_loss": train_loss, "val_accuracy": val_accuracy,
                   "val_loss": val.get("loss")} | ({"val_top5": val.get("top5")} if self.top5 else {}) | {
                   "images_per_second": images / seconds, "train_seconds": seconds,
                   "eval_seconds": eval_seconds, "epoch_seconds": seconds + eval_seconds,
                   "lr": self.optimizer.param_groups[0]["lr"],
                   "achieved_flops_per_s": self.flops_per_image * images / self.ranks.world_size / seconds,
                   } | accounting
            state.count_epoch(row, images, seconds, diverged)
            reached = state.note_target(c.target_accuracy, val_accuracy)
            improved = state.note_validation(epoch + 1, val_accuracy)
            self._save(improved)
            table.row(row, improved)
            if reached:
                say(f"validation accuracy {val_accuracy:.4f} reached the target {c.target_accuracy} at epoch "
                    f"{state.epoch} ({state.wall_seconds:.1f} s, {state.images_seen:,} images)", ranks)
        self._finish()

    def _compile(self) -> None:
        compile_warmup(self)

    def step_begin(self) -> None:
        """reduce-overhead: a new step begins, so the CUDA graphs may reuse the last step's output memory."""
        if self.config.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()

    def _should_stop(self) -> bool:
        if self.state.diverged or (self.config.stop_at_target and self.state.target is not None):
            return True
        patience = self.config.patience
        return patience is not None and self.state.stale_epochs >= patience

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

    def _save(self, improved: bool) -> None:
        """Rank 0 writes the epoch's checkpoint, the best weights and epochs.csv, each atomically."""
        if not self.ranks.is_main:
            return
        if improved:
            save_checkpoint(self.record.path(BEST), {"model": self.model.state_dict(), "epoch": self.state.epoch})
        self._save_checkpoint()
        self.record.write_epochs(self.state.history)
        if self.accounting.events is not None:
            self.accounting.events.epoch(self.state.history[-1])

    def _save_checkpoint(self) -> None:
        """What a resumed run or a torchrun restart continues from; weights that are not finite are no start."""
        if not self.state.diverged:
            save_checkpoint(self.record.path(CHECKPOINT), {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.precision.state_dict(),
                "state": self.state.saved()})

    def _finish(self) -> None:
        """Score the best weights on the test set once, and write the summary (last: it marks the run done). A run
        that diverged is scored on nothing: its summary says where, then every rank raises TrainingDiverged."""
        state, diverged = self.state, self.state.diverged
        test_accuracy = shift_images = shift_clean = shift_accuracy = shift_seconds = None
        if not diverged:
            weights = "the last weights"
            if state.best_epoch is not None:
                best = load_checkpoint(self.record.path(BEST), self.ranks)
                self.model.load_state_dict(best["model"])
                weights = f"the best weights (epoch {state.best_epoch})"
            say(f"evaluating {weights} on {len(self.splits.test):,} test images"
                + (f" and shifted copies ({self.config.eval_shift})" if self.config.eval_shift else ""), self.ranks)
            test_accuracy = self.evaluate(self.splits.test)
            shift_start = time.perf_counter()
            shift_images, shift_clean, shift_accuracy = evaluate_shifts(self)
            shift_seconds = time.perf_counter() - shift_start if shift_accuracy is not None else None
        summary = run_summary(self, test_accuracy, shift_images, shift_clean, shift_accuracy, shift_seconds)
        if self.ranks.is_main:
            self.record.write_summary(summary)
        if not diverged:
            say(final_line(summary, self.record.dir), self.ranks)
        world.barrier(self.ranks)
        if diverged:
            raise TrainingDiverged.at(diverged, self.config.resolved_lr, self.record.dir)


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
