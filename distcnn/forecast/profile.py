"""The one-rank profile a forecast starts from: K steady-state steps of the configuration on this machine.

The configuration's own model, data, augmentation, precision, memory format and optimizer train for real, on
one rank wrapped in DDP (a process group of one, in this process), so the step carries DDP's bucketing as a
run on N ranks does. Per step: the phases (distcnn.telemetry.steps.StepTimer, as in training) and when each
gradient is ready in backward (distcnn.telemetry.gradients). The first steps are warm-up and left out (kernel
selection, first-touch allocation, DDP's bucket rebuild after step 1): their cost is reported apart, as the
run summary's warmup_seconds is. Then a few steps with each other comm hook: what the hook's own compute
(casting, PowerSGD's factors) adds to backward, and the bytes it hands over (counted at the collective, as in a
run), which the model's message sizes are checked against. A hook's own compute is the least time a step spent
inside it, less allreduce's least: what else takes the core meanwhile only adds to a step's time in the hook
(a few ms, as much as PowerSGD's own compute for a small net), so the least is the step nothing interrupted.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distcnn import comm, speed
from distcnn.config import TrainConfig
from distcnn.console import say
from distcnn.forecast.model import HOOKS, Gradient, Profile
from distcnn.models import create_model
from distcnn.parallel.ranks import Ranks
from distcnn.parallel.world import pick_device
from distcnn.pipeline import EvalInputs, TrainInputs, eval_batch_size
from distcnn.summary import PHASES
from distcnn.telemetry.gradients import GradientReadiness
from distcnn.telemetry.steps import StepTimer
from distcnn.trainer import build_optimizer, build_scheduler, load_splits

WARMUP_STEPS = 3  # step 1 builds DDP's first buckets, step 2 rebuilds them: steady from step 3 on
MAIN_SECONDS = 12.0  # measured time of the allreduce steps, about
HOOK_SECONDS = 1.5  # measured time of each other hook's steps, about: its own compute is timed inside it


@dataclass
class Profiled:
    """A profile and what it was measured with."""

    profile: Profile
    meta: dict = field(default_factory=dict)


class _World:
    """A process group of one rank in this process (gloo over an in-memory store), for DDP to wrap the model."""

    def __enter__(self):
        self.own = not dist.is_initialized()
        if self.own:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        return self

    def __exit__(self, *exc):
        if self.own:
            dist.destroy_process_group()


def profile(config: TrainConfig, threads: int, quiet: bool = False, main_seconds: float = MAIN_SECONDS,
            hook_seconds: float = HOOK_SECONDS, hooks: tuple[str, ...] = HOOKS, alongside: int = 0) -> Profiled:
    """Profile `config` on one rank with `threads` CPU threads: about `main_seconds` of steps with allreduce
    (at least 3, at most 60 after the warm-up), then `hook_seconds` with each other hook of `hooks`.

    `alongside`: how many other ranks share this machine in the run forecast (ranks of one CPU node; every
    emulated host's ranks): as many processes train the same step beside the profile, so its compute is
    timed under the same contention for cores, caches and memory bandwidth (distcnn.forecast.alongside)."""
    from distcnn.forecast.alongside import Alongside

    started = time.perf_counter()
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    device = pick_device(config.device, 0)
    ranks = Ranks(0, 0, 1, 1, device, "gloo")
    try:
        with Alongside(config, threads, alongside), _World():
            profiled = _profile(config, ranks, threads, started, quiet, main_seconds, hook_seconds, hooks)
        profiled.meta["alongside"] = alongside
        return profiled
    finally:
        torch.set_num_threads(saved_threads)


def _profile(config: TrainConfig, ranks: Ranks, threads: int, started: float, quiet: bool, main_seconds: float,
             hook_seconds: float, hooks: tuple[str, ...]) -> Profiled:
    loop = build_loop(config, ranks)
    splits, model, memory_format = loop.splits, loop.model, loop.memory_format
    main = loop.run("allreduce", main_seconds, readiness=True)
    others = [hook for hook in HOOKS if hook in hooks and hook != "allreduce"]
    if not quiet and others:
        more = (hook_seconds + main["warmup_seconds"] / 2) * len(others)
        say(f"profiled {main['steps']} steps with allreduce in {time.perf_counter() - started:.1f} s; "
            f"{len(others)} more hook(s), about {more:.0f} s")
    runs = {"allreduce": main} | {hook: loop.run(hook, hook_seconds) for hook in others}
    gradients = tuple(Gradient.of(row) for row in main["gradients"])
    eval_seconds = _eval_seconds(model, splits, ranks, memory_format, config)
    prof = Profile(
        phases={phase: statistics.fmean(s.get(phase, 0.0) for s in main["phases"]) for phase in PHASES},
        gradients=gradients, batch_size=config.batch_size,
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        hook_compute={hook: run["hook_seconds"] - main["hook_seconds"] for hook, run in runs.items()},
        train_images=len(splits.train), eval_seconds=eval_seconds,
        step_stdev_s=robust_stdev([sum(s.values()) for s in main["phases"]]))
    meta = {"source": "profile", "model": config.model, "batch_size": config.batch_size, "threads": threads,
            "device": str(ranks.device), "precision": config.precision, "bucket_cap_mb": config.bucket_cap_mb,
            "steps": {hook: run["steps"] for hook, run in runs.items()},
            "warmup_seconds": main["warmup_seconds"],
            "counted_bytes_per_step": {hook: run["bytes_per_step"] for hook, run in runs.items()},
            "step_seconds_measured": statistics.fmean(sum(s.values()) for s in main["phases"]),
            "profile_seconds": time.perf_counter() - started, "eval_seconds_estimated": True}
    return Profiled(prof, meta)


def robust_stdev(values: list[float]) -> float:
    """The spread of the ranks' steps, as a normal one's standard deviation: 1.4826 × the median absolute
    deviation. What the slowest of n ranks adds is their own jitter; a few seconds in which the whole machine
    slows down (it slows every rank alike) would inflate a plain standard deviation several times over."""
    middle = statistics.median(values)
    return 1.4826 * statistics.median(abs(value - middle) for value in values)


def build_loop(config: TrainConfig, ranks: Ranks) -> _Loop:
    """The configuration's data, model, inputs and optimizer, as distcnn.trainer.Trainer builds them."""
    torch.manual_seed(config.seed)
    splits = load_splits(config)
    model = create_model(config.model, in_chans=splits.channels, num_classes=splits.num_classes,
                         width=config.width)
    layout = speed.resolve_layout(config.memory_format, ranks.device.type, config.precision)
    memory_format = speed.torch_format(layout)
    model = model.to(ranks.device, memory_format=memory_format)
    inputs = TrainInputs(splits, config, ranks, memory_format)
    optimizer = build_optimizer(model, config, ranks.device.type)
    build_scheduler(optimizer, config, len(inputs))  # the learning rate a run starts with
    return _Loop(config, ranks, splits, model, memory_format, inputs, optimizer)


class _Loop:
    """The training step of distcnn.trainer.Trainer, timed the same way, on a DDP of one rank."""

    def __init__(self, config, ranks, splits, model, memory_format, inputs, optimizer):
        self.config, self.ranks, self.model, self.inputs = config, ranks, model, inputs
        self.splits, self.memory_format, self.optimizer = splits, memory_format, optimizer
        self.precision = speed.Precision(config.precision, ranks.device)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.batches = self._batches()

    def _batches(self):
        epoch = 0
        while True:
            self.inputs.set_epoch(epoch)
            yield from self.inputs
            epoch += 1

    def run(self, hook: str, seconds: float, readiness: bool = False, steps: int | None = None) -> dict:
        """Warm-up steps, then measured steps for about `seconds` (at least 3, at most 60; or `steps` in all)."""
        options = {"bucket_cap_mb": self.config.bucket_cap_mb} if self.config.bucket_cap_mb else {}
        ddp = DistributedDataParallel(self.model, **options)
        inside = [0.0]  # seconds spent in the hook and its futures' callbacks, all steps
        counter = comm.register(ddp, hook, count=True, powersgd_rank=self.config.powersgd_rank,
                                wrap=lambda chosen: _timed(chosen, inside))
        step_model = speed.compile_model(ddp, self.config.compile)
        step_model.train()
        ready = GradientReadiness(self.model, self.ranks.device) if readiness else None
        timer = StepTimer(self.ranks.device)
        marks, counted, hook_seconds = [], [], []
        start, warm, step = time.perf_counter(), 0.0, 0
        while True:
            measured = step >= WARMUP_STEPS
            if step == WARMUP_STEPS:
                warm = time.perf_counter() - start
                timer.start()
            raw = next(self.batches)
            if not measured:
                timer.start()
            timer.mark("data_wait")
            x, targets = self.inputs.prepare(*raw)
            timer.mark("augmentation")
            with self.precision.autocast():
                loss = self.criterion(step_model(x), targets)
            timer.mark("forward")
            if ready is not None and measured:
                ready.arm()
            self.precision.backward(loss)
            timer.mark("backward")
            if ready is not None and measured:
                marks.append(ready.read())
            self.precision.step(self.optimizer)  # the schedule is not stepped: a profile may outlast it
            self.optimizer.zero_grad(set_to_none=True)
            timer.mark("optimizer")
            timer.end_step()
            taken = counter.take()
            if measured:
                counted.append(taken)
                hook_seconds.append(inside[0])
            inside[0] = 0.0
            step += 1
            if steps is not None and step >= steps:
                break
            if steps is None and measured and step - WARMUP_STEPS >= 3 and (
                    time.perf_counter() - start - warm >= seconds or step - WARMUP_STEPS >= 60):
                break
        phases = timer.finish()
        del step_model, ddp  # its reducer's autograd hooks go with it, before the next hook's DDP
        result = {"phases": phases, "steps": len(phases), "warmup_seconds": warm,
                  "bytes_per_step": statistics.fmean(counted), "hook_seconds": min(hook_seconds)}
        if marks:
            result["gradients"] = _median_readiness(marks)
        return result


def _timed(hook, inside: list[float]):
    """The hook, waited for and timed: on a process group of one its collectives cost next to nothing, so what
    it takes is its own compute (casts; PowerSGD's matmuls and orthogonalisation)."""

    def timed(state, bucket):
        start = time.perf_counter()
        future = hook(state, bucket)
        future.wait()
        inside[0] += time.perf_counter() - start
        return future

    return timed


def _median_readiness(marks: list[list[dict]]) -> list[dict]:
    """Each parameter's median ready time over the measured steps, in the order of the medians."""
    by_name: dict[str, list[dict]] = {}
    for rows in marks:
        for row in rows:
            by_name.setdefault(row["name"], []).append(row)
    merged = []
    for name, rows in by_name.items():
        times = [row["ready_s"] for row in rows if row["ready_s"] is not None]
        if not times:
            continue  # a parameter that never gets a gradient is in no bucket's wait
        merged.append(rows[0] | {"ready_s": statistics.median(times)})
    return sorted(merged, key=lambda row: row["ready_s"])


@torch.inference_mode()
def _eval_seconds(model, splits, ranks, memory_format, config) -> float | None:
    """One rank's validation pass over the whole validation split, estimated from a few batches."""
    if not len(splits.val):
        return None
    batch = eval_batch_size(config.batch_size, splits.channels, splits.image_size)
    inputs = EvalInputs(splits.val, splits.mean, splits.std, batch, ranks, None, memory_format)
    precision = speed.Precision(config.precision, ranks.device)
    model.eval()
    seen, start, batches = 0, None, 0
    with precision.autocast():
        for x, labels in inputs:
            if batches == 1:  # the first batch is warm-up
                seen, start = 0, time.perf_counter()
            model(x).float().argmax(dim=1).sum().item()
            seen += labels.numel()
            batches += 1
            if batches >= 4:
                break
    model.train()
    if start is None or not seen:
        return None
    return (time.perf_counter() - start) / seen * len(splits.val)
