"""The one training loop (1..N ranks), evaluation, early stopping, checkpoints — and starting a run.

`run(config)` is the whole job as the CLI and the study runner see it: validate everything that can be
checked before any process starts, prepare the run directory, train (in this process, or on torchrun's
workers), and return the summary. `train(config, run_dir)` is what each rank executes.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distcnn import comm, parallel, shifts, speed
from distcnn.decomposition import strategy as decomposition
from distcnn.augment import build_augment, build_batch_mix, get_policy
from distcnn.checkpoint import load_checkpoint, save_checkpoint
from distcnn.config import TrainConfig
from distcnn.console import EpochTable, StepProgress, say
from distcnn.data import DataSplits, ImageSet, load_data
from distcnn.errors import UsageError, WorkersFailed
from distcnn.models import check_input_size, count_params, create_model, train_flops_per_image
from distcnn.parallel import Ranks
from distcnn.pipeline import EvalInputs, TrainInputs, eval_batch_size
from distcnn.telemetry.accounting import Accounting
from distcnn.record import BEST, CHECKPOINT, RunRecord, describe_environment

# Options that may differ when a run is resumed: how it runs, not what it computes.
RESUMABLE_DIFFERENCES = {"resume", "out", "threads", "workers", "device", "max_restarts", "rdzv_endpoint",
                         "rdzv_backend", "rdzv_id", "node_rank", "telemetry", "sample_interval", "cluster",
                         "bandwidth", "delay"}


DATA_OPTIONS = ("data", "data_dir", "image_size", "train_subset", "val_fraction", "test_fraction", "split_seed",
                "download")


def load_splits(config: TrainConfig) -> DataSplits:
    data, *options = DATA_OPTIONS  # load_data's keywords carry the options' own names
    return load_data(getattr(config, data), **{name: getattr(config, name) for name in options})


def data_options(config: TrainConfig) -> tuple:
    """What decides the data a run loads: runs that agree on these share their splits."""
    return tuple(getattr(config, name) for name in DATA_OPTIONS)


def validate(config: TrainConfig, splits: DataSplits | None = None) -> DataSplits:
    """Check data, model, augmentation and parallelism before anything is written or started (`splits`: the
    data already loaded for these data options, as a study checking many configurations passes it)."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible here; use --device cpu or auto")
    parallel.check_gpus(config)
    speed.check(config.precision, config.compile, parallel.device_type(config.device))
    if config.cluster == "emulated":
        from distcnn import cluster

        cluster.ready_hosts(config.nnodes)  # root, iproute2 and enough hosts
    splits = splits if splits is not None else load_splits(config)
    build_augment(config.policy, config.aug_backend, splits.channels, splits.image_size, config.aug_strength)
    shifts.parse_shifts(config.eval_shift)
    build_batch_mix(config.mixup, config.cutmix, splits.num_classes)
    model = create_model(config.model, in_chans=splits.channels, num_classes=splits.num_classes, width=config.width)
    check_input_size(model, splits.channels, splits.image_size, config.model)
    if config.strategy == "dd":
        decomposition.validate(config, splits)
    world = config.nproc_per_node * config.nnodes
    if len(splits.train) < 2 * world:
        raise UsageError(f"{len(splits.train)} training images are too few for {world} ranks (need 2 per rank)")
    return splits


def default_run_dir(config: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{stamp}-{config.run_name}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def prepare_run_dir(config: TrainConfig) -> tuple[RunRecord, bool]:
    """The run directory, checked against what it already holds; returns (record, created_now)."""
    run_dir = Path(config.out) if config.out else default_run_dir(config)
    record = RunRecord(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file, not a directory")
    if record.path("config.json").exists():
        saved = record.read_config()
        current = config.model_dump()
        changed = sorted(k for k in current if k not in RESUMABLE_DIFFERENCES and saved.get(k) != current[k])
        # The other machines of a multi-node job may share this folder: they join the same unfinished run.
        joining = config.nnodes > 1 and not changed and not record.finished
        if not (config.resume or joining):
            state = "a finished run" if record.finished else "an unfinished run (pass --resume to continue it)"
            raise UsageError(f"{run_dir} already holds {state}; choose another --out")
        if changed:
            raise UsageError(f"--resume: {run_dir} was started with other options: {', '.join(changed)}")
        return record, False
    if config.resume and config.out is None:
        raise UsageError("--resume needs --out RUN_DIR (the run to continue)")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write_config(config.model_dump() | {"out": str(run_dir)})
    return record, created


def run(config: TrainConfig) -> dict | None:
    """Validate, prepare the run directory, train, and return the summary. Raises UsageError on bad input.

    Returns None on a machine of a multi-node job that does not see rank 0's summary (another filesystem)."""
    validate(config)
    record, created = prepare_run_dir(config)
    if record.finished:
        say(f"{record.dir} is already finished; nothing to do")
        return record.read_summary()
    try:
        if config.cluster == "emulated":
            parallel.launch_emulated(config, record.dir)
        elif parallel.needs_torchrun(config):
            parallel.launch(config, record.dir)
        else:
            train(config, record.dir)
    except (UsageError, WorkersFailed) as error:
        # A mistake found only by the workers: leave nothing half-written behind.
        if created and not record.has_checkpoint and getattr(error, "exit_code", 2) == 2:
            shutil.rmtree(record.dir, ignore_errors=True)
        raise
    return record.read_summary() if record.finished else None


def train(config: TrainConfig, run_dir: Path) -> None:
    """What every rank runs: set up its place in the job, start its accounting, train, and tear down."""
    ranks = parallel.setup(config)
    record = RunRecord(run_dir)
    if config.strategy == "dd" and config.dd_mode == "independent":
        try:
            decomposition.train_independent(config, record, ranks, load_splits(config), Trainer)
        finally:
            parallel.teardown(ranks)
        return
    accounting = Accounting(config, record, ranks)
    try:
        if config.strategy == "dd":  # coherent or transfer: the whole CNN-DNN is the model
            splits = load_splits(config)
            if config.dd_mode == "transfer":
                config = decomposition.transfer_start(config, record, ranks, splits, Trainer)
            trainer = Trainer(config, record, ranks, accounting, splits=splits,
                              build_model=lambda splits: decomposition.coherent_model(config, splits))
            trainer.summary_extra = lambda summary: decomposition.coherent_extra(config, trainer.model, summary)
            trainer.fit()
        else:
            Trainer(config, record, ranks, accounting).fit()
    finally:
        accounting.stop()
        parallel.teardown(ranks)


def seed_for(config: TrainConfig, epoch: int, rank: int) -> int:
    """A seed per (epoch, rank): augmentation differs across ranks, and a resumed epoch replays exactly."""
    return (config.seed * 1_000_003 + epoch * 10_007 + rank) % (2**63)


class Trainer:
    """One run on one rank: the model, its optimiser and schedule, and the epoch loop."""

    def __init__(self, config: TrainConfig, record: RunRecord, ranks: Ranks, accounting: Accounting,
                 build_model=None, splits: DataSplits | None = None):
        """`build_model(splits) -> nn.Module` replaces the config's model (a local CNN, a CNN-DNN): any
        network that takes whole images trains through the same loop."""
        self.config, self.record, self.ranks, self.accounting = config, record, ranks, accounting
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.splits = splits if splits is not None else load_splits(config)
        splits = self.splits
        if build_model is None:
            model = create_model(config.model, in_chans=splits.channels, num_classes=splits.num_classes,
                                 width=config.width)
        else:
            model = build_model(splits)
        self.layout = speed.resolve_layout(config.memory_format, ranks.device.type, config.precision)
        self.memory_format = speed.torch_format(self.layout)
        self.model = model.to(ranks.device, memory_format=self.memory_format)
        self.precision = speed.Precision(config.precision, ranks.device)
        self.summary_extra = lambda summary: {}  # what a strategy adds to the summary
        self.params = count_params(self.model)
        self.flops_per_image = train_flops_per_image(self.model, splits.channels, splits.image_size)
        self.inputs = TrainInputs(splits, config, ranks, self.memory_format)
        self.eval_batch = eval_batch_size(config.batch_size, splits.channels, splits.image_size)
        self.steps_per_epoch = len(self.inputs)
        self.optimizer = self._optimizer()
        self.scheduler = self._scheduler()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        # wall_seconds: training + validation of every epoch so far; target: where --target-accuracy was met
        self.state = {"epoch": 0, "best_val_accuracy": None, "best_epoch": None, "stale_epochs": 0,
                      "train_seconds": 0.0, "wall_seconds": 0.0, "images_seen": 0, "target": None,
                      "history": [], "resumed_at": []}
        self._resume()
        self._note_restart()
        self.ddp = self.model
        if ranks.distributed:
            ids = [ranks.device.index] if ranks.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
            accounting.attach(self.ddp)
        self.step_model = speed.compile_model(self.ddp, config.compile)  # what the step calls
        self.compile_seconds: float | None = None

    def _optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        decay, no_decay = [], []
        for p in self.model.parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)  # no decay on biases and norm scales
        groups = [{"params": decay, "weight_decay": c.resolved_weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # On a GPU the fused update is one kernel for all parameters, and with fp16 it reads the scaler's
        # overflow flag on the device (no host sync per step); on the CPU the default (foreach) update.
        fused = {"fused": True} if self.ranks.device.type == "cuda" else {}
        if c.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=c.resolved_lr, momentum=c.momentum, nesterov=c.momentum > 0, **fused)
        return torch.optim.AdamW(groups, lr=c.resolved_lr, **fused)

    def _scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        total = max(1, self.config.epochs * self.steps_per_epoch)
        if self.config.schedule == "onecycle" and total >= 3:
            # a warm-up of at least two steps: torch's OneCycleLR divides by zero when it would last one (4 steps)
            return torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=self.config.resolved_lr,
                                                       total_steps=total, pct_start=max(0.25, 2 / total))
        return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total)

    def _resume(self) -> None:
        """Continue from the last checkpoint when there is one (--resume, or a torchrun restart)."""
        if not parallel.broadcast_flag(self.record.has_checkpoint, self.ranks):  # rank 0's file decides
            return
        checkpoint = load_checkpoint(self.record.path(CHECKPOINT), self.ranks)
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.precision.load_state_dict(checkpoint.get("scaler"))
        self.state = self.state | checkpoint["state"]  # a checkpoint from before a new key keeps its default
        self.state["resumed_at"] = self.state["resumed_at"] + [self.state["epoch"]]
        say(f"resuming {self.record.dir} after epoch {self.state['epoch']}", self.ranks)

    def _note_restart(self) -> None:
        """A run restarted by torchrun (--max-restarts) records it: which restart, from which epoch on."""
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        if restart and self.ranks.is_main:
            self.state["restarts"] = self.state.get("restarts", []) + [
                {"restart": restart, "resumed_after_epoch": self.state["epoch"]}]
            say(f"restart {restart}: continuing after epoch {self.state['epoch']}", self.ranks)

    def fit(self) -> None:
        c, ranks, state = self.config, self.ranks, self.state
        hosts = parallel.gather_hosts(ranks)
        if ranks.is_main:
            self.record.write_environment(describe_environment(
                ranks.world_size, ranks.local_world_size, torch.get_num_threads(), str(ranks.device),
                ranks.backend or "none") | {"hosts": hosts} | self.speed_options())
        self._compile()
        table = EpochTable(ranks)
        while state["epoch"] < c.epochs and not self._should_stop():
            epoch = state["epoch"]
            train_loss, images, seconds = self._train_epoch(epoch)
            accounting = self.accounting.end_epoch(epoch)
            eval_start = time.perf_counter()
            val_accuracy = self.evaluate(self.splits.val) if len(self.splits.val) else None
            eval_seconds = time.perf_counter() - eval_start
            row = {"epoch": epoch + 1, "train_loss": train_loss, "val_accuracy": val_accuracy,
                   "images_per_second": images / seconds, "train_seconds": seconds,
                   "eval_seconds": eval_seconds, "epoch_seconds": seconds + eval_seconds,
                   "lr": self.optimizer.param_groups[0]["lr"],
                   "achieved_flops_per_s": self.flops_per_image * images / self.ranks.world_size / seconds,
                   } | accounting
            state["history"].append(row)
            state["epoch"] = epoch + 1
            state["train_seconds"] += seconds
            state["wall_seconds"] += row["epoch_seconds"]
            state["images_seen"] += images
            reached = self._note_target(val_accuracy)
            improved = val_accuracy is not None and (
                state["best_val_accuracy"] is None or val_accuracy > state["best_val_accuracy"])
            if improved:
                state["best_val_accuracy"], state["best_epoch"], state["stale_epochs"] = val_accuracy, epoch + 1, 0
            else:
                state["stale_epochs"] += 1
            self._save(improved)
            table.row(row, improved)
            if reached:
                say(f"validation accuracy {val_accuracy:.4f} reached the target {c.target_accuracy} at epoch "
                    f"{state['epoch']} ({state['wall_seconds']:.1f} s, {state['images_seen']:,} images)", ranks)
        self._finish()

    def speed_options(self) -> dict:
        c = self.config
        return speed.describe(c.precision, c.memory_format, c.compile, self.ranks.device.type)

    def _compile(self) -> None:
        """Compile the step's model before the first epoch, on a batch of the training shape, so that compilation
        is timed on its own (compile_seconds) and not inside epoch 1. The warm-up changes nothing: its gradients
        are dropped, its communicated bytes are not counted, BatchNorm's running statistics are restored, and it
        draws no random numbers before the epoch seeds its generator. reduce-overhead also records its CUDA
        graphs here (they are recorded on a later call than the first)."""
        if self.config.compile == "off":
            return
        saved = [buffer.clone() for buffer in self.model.buffers()]
        x = torch.zeros(self.inputs.batch_shape, device=self.ranks.device).contiguous(memory_format=self.memory_format)
        targets = torch.zeros(x.shape[0], dtype=torch.long, device=self.ranks.device)
        self.step_model.train()
        self._sync()
        start = time.perf_counter()
        for _ in range(3 if self.config.compile == "reduce-overhead" else 1):
            self._step_begin()
            with self.precision.autocast():
                loss = self.criterion(self.step_model(x), targets)
            loss.backward()
            self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            for buffer, value in zip(self.model.buffers(), saved):
                buffer.copy_(value)
        if self.accounting.counter is not None:
            self.accounting.counter.take()
        self.compile_seconds = parallel.all_reduce_max(seconds, self.ranks)
        say(f"compiled the model ({self.config.compile}) in {self.compile_seconds:.1f} s", self.ranks)

    def _step_begin(self) -> None:
        """reduce-overhead: a new step begins, so the CUDA graphs may reuse the last step's output memory."""
        if self.config.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()

    def _note_target(self, val_accuracy: float | None) -> bool:
        """Time to accuracy, the MLPerf way: the first epoch whose validation accuracy reaches the target, with
        the wall seconds (training + validation, checkpoints excluded) and images up to and including it.
        True when this epoch is that one."""
        target, state = self.config.target_accuracy, self.state
        if target is None or state["target"] is not None or val_accuracy is None or val_accuracy < target:
            return False
        state["target"] = {"epoch": state["epoch"], "seconds": state["wall_seconds"], "images": state["images_seen"]}
        return True

    def _should_stop(self) -> bool:
        if self.config.stop_at_target and self.state["target"] is not None:
            return True
        patience = self.config.patience
        return patience is not None and self.state["stale_epochs"] >= patience

    def _train_epoch(self, epoch: int) -> tuple[float, int, float]:
        """Train one epoch; returns (mean loss over all ranks, images over all ranks, wall seconds)."""
        torch.manual_seed(seed_for(self.config, epoch, self.ranks.rank))
        self.inputs.set_epoch(epoch)
        self.ddp.train()
        loss_sum = torch.zeros((), device=self.ranks.device)
        images = 0
        progress = StepProgress(self.ranks, f"epoch {epoch + 1}/{self.config.epochs}", self.steps_per_epoch,
                                self.accounting.live)
        timer = self.accounting.timer
        self.optimizer.zero_grad(set_to_none=True)
        self.accounting.begin_epoch(epoch)  # the timer's first phase starts here
        self._sync()
        start = time.perf_counter()
        with progress:
            for step, (raw_images, raw_labels) in enumerate(self.inputs):
                timer.mark("data_wait")
                x, targets = self.inputs.prepare(raw_images, raw_labels)
                timer.mark("augmentation")
                self._step_begin()
                with self.precision.autocast():
                    loss = self.criterion(self.step_model(x), targets)
                timer.mark("forward")
                self.precision.backward(loss)
                timer.mark("backward")
                self.precision.step(self.optimizer)
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach() * x.shape[0]
                images += x.shape[0]
                progress.advance(step, loss, images, time.perf_counter() - start)
                timer.mark("optimizer")
                self.accounting.end_step()
            self._sync()
            seconds = time.perf_counter() - start
        total_loss, total_images = parallel.all_reduce_sum([loss_sum.item(), float(images)], self.ranks)
        seconds = parallel.all_reduce_max(seconds, self.ranks)
        return total_loss / max(1.0, total_images), int(total_images), seconds

    def _sync(self) -> None:
        if self.ranks.device.type == "cuda":
            torch.cuda.synchronize(self.ranks.device)

    @torch.inference_mode()
    def evaluate(self, images, shift: shifts.Shift | None = None) -> float:
        """Accuracy over a whole split (optionally shifted): each rank scores its shard in large batches, at the
        run's precision, counting on the device (one read at the end); the counts are summed over ranks."""
        self.model.eval()
        correct = torch.zeros((), dtype=torch.long, device=self.ranks.device)
        total = 0
        inputs = EvalInputs(images, self.splits.mean, self.splits.std, self.eval_batch, self.ranks, shift,
                            self.memory_format)
        with self.precision.autocast():
            for x, labels in inputs:
                correct += (self.model(x).argmax(dim=1) == labels).sum()
                total += labels.numel()
        correct, total = parallel.all_reduce_sum([float(correct.item()), float(total)], self.ranks)
        return correct / total if total else math.nan

    def _evaluate_shifts(self) -> tuple[int | None, float | None, dict[str, dict[str, float]] | None]:
        """--eval-shift: (images scored, their unshifted accuracy, {shift: {"1": accuracy, ...}}) on shifted
        copies of the test set, or of --shift-images of its images. Shifts and subset are seeded by the split
        seed: every run of a study is scored on the same shifted images."""
        names = shifts.parse_shifts(self.config.eval_shift)
        if not names:
            return None, None, None
        test, n = self.splits.test, self.config.shift_images
        if n is not None and n < len(test):
            generator = torch.Generator().manual_seed(self.config.split_seed)
            chosen = torch.randperm(len(test), generator=generator)[:n].sort().values
            test = ImageSet(test.images[chosen], test.labels[chosen])
        clean = self.evaluate(test) if test is not self.splits.test else None
        accuracy = {name: {str(severity): self.evaluate(test, shifts.Shift(name, severity, self.config.split_seed))
                           for severity in shifts.SEVERITIES} for name in names}
        return len(test), clean, accuracy

    def shifts_in_training(self) -> list[str]:
        """The shifts this run's augmentation (at its strength) and CutMix train on."""
        policy = get_policy(self.config.policy).scaled(self.config.aug_strength).for_channels(self.splits.channels)
        return shifts.shifts_in_training(policy, self.config.cutmix)

    def _save(self, improved: bool) -> None:
        """Rank 0 writes the epoch's checkpoint, the best weights and epochs.csv, each atomically."""
        if not self.ranks.is_main:
            return
        if improved:
            save_checkpoint(self.record.path(BEST), {"model": self.model.state_dict(), "epoch": self.state["epoch"]})
        save_checkpoint(self.record.path(CHECKPOINT), {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.precision.state_dict(),
            "state": copy.deepcopy(self.state)})
        self.record.write_epochs(self.state["history"])

    def _finish(self) -> None:
        """Score the best weights on the test set once, and write the summary (last: it marks the run done)."""
        state = self.state
        if state["best_epoch"] is not None:
            best = load_checkpoint(self.record.path(BEST), self.ranks)
            self.model.load_state_dict(best["model"])
        test_accuracy = self.evaluate(self.splits.test)
        shift_start = time.perf_counter()
        shift_images, shift_clean, shift_accuracy = self._evaluate_shifts()
        shift_seconds = time.perf_counter() - shift_start if shift_accuracy is not None else None
        target = state["target"] or {}
        summary = {
            "name": self.config.run_name,
            "model": self.config.model,
            "policy": self.config.policy,
            "aug_backend": self.config.aug_backend,
            **self.speed_options(),
            "data": self.splits.name,
            "world_size": self.ranks.world_size,
            "test_accuracy": test_accuracy,
            "best_val_accuracy": state["best_val_accuracy"],
            "best_epoch": state["best_epoch"],
            "epochs_run": state["epoch"],
            "stopped_early": state["epoch"] < self.config.epochs,
            "train_seconds": state["train_seconds"],
            "eval_seconds": sum(row.get("eval_seconds") or 0.0 for row in state["history"]),
            "compile_seconds": self.compile_seconds,
            "images_seen": state["images_seen"],
            "images_per_second": state["images_seen"] / state["train_seconds"] if state["train_seconds"] else None,
            "params": self.params,
            "train_flops_per_image": self.flops_per_image,
            "achieved_flops_per_s": (self.flops_per_image * state["images_seen"] / self.ranks.world_size
                                     / state["train_seconds"]) if state["train_seconds"] else None,
            "gradient_bytes": comm.gradient_bytes(self.model),
            "train_images": len(self.splits.train),
            "val_images": len(self.splits.val),
            "test_images": len(self.splits.test),
            "resumed_at_epochs": state["resumed_at"],
            "restarts": state.get("restarts", []),
            "telemetry": self.config.telemetry,
            "aug_strength": self.config.aug_strength,
            "target_accuracy": self.config.target_accuracy,
            "time_to_target_seconds": target.get("seconds"),
            "epochs_to_target": target.get("epoch"),
            "images_to_target": target.get("images"),
            # True only when --stop-at-target cut the run short (a target met in the last epoch stops nothing)
            "stopped_at_target": bool(self.config.stop_at_target and target and state["epoch"] < self.config.epochs),
            "shift_images": shift_images,
            "shift_clean_accuracy": test_accuracy if shift_accuracy and shift_clean is None else shift_clean,
            "shift_accuracy": shift_accuracy,
            "shift_accuracy_mean": (sum(a for by in shift_accuracy.values() for a in by.values())
                                    / sum(len(by) for by in shift_accuracy.values())) if shift_accuracy else None,
            "shifts_in_training": self.shifts_in_training(),
            "shift_eval_seconds": shift_seconds,
        } | self.accounting.summary(state["history"])
        summary |= self.summary_extra(summary)
        if self.ranks.is_main:
            self.record.write_summary(summary)
            say(f"test accuracy {test_accuracy:.4f} after {state['epoch']} epochs "
                f"({state['train_seconds']:.1f} s training) — run record: {self.record.dir}", self.ranks)
        parallel.barrier(self.ranks)
