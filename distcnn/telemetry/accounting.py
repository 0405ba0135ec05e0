"""A rank's accounting of its run: the resource sampler, the step timers, the counted gradient bytes, and
DDP's own communication timers — started with the rank, read by the training loop, summarised at the end.
It counts only: the comm hook that hands the bytes over is registered by the trainer. Rank 0 also times when
each gradient is ready in one backward pass (gradients.json).

`--telemetry off` keeps the same calls but measures nothing (the trainer then leaves DDP on its built-in
allreduce), so the overhead benchmark can compare the two in one run; every figure is then None, never 0.
"""

from __future__ import annotations

import os

import torch

from distcnn import comm
from distcnn.config import TrainConfig
from distcnn.parallel import world
from distcnn.parallel.ranks import Ranks
from distcnn.record import RunRecord
from distcnn.telemetry.counters import run_interfaces
from distcnn.telemetry.gradients import GradientReadiness
from distcnn.telemetry.resources import combine_ranks
from distcnn.telemetry.sampler import ResourceSampler
from distcnn.telemetry.steps import StepTimer, epoch_figures, epoch_medians, run_breakdown, warm_up
from distcnn.telemetry.tensorboard import EventLog

DDP_SAMPLE_EVERY = 10  # steps between DDP's own runtime timers (it also times each of the first 10)
DDP_TIMES = {"ddp_comm": "backward_comm_time", "ddp_overlap": "backward_compute_comm_overlap_time",
             "ddp_backward_compute": "backward_compute_time"}
# the step whose backward pass is timed for gradients.json: DDP rebuilds its buckets after the first
# iteration, in the order the gradients became ready there, so the 3rd step runs on the buckets it keeps
TIMED_BACKWARD_STEP = 3
EPOCH_RESOURCES = ("cpu_percent_mean", "process_cpu_percent_mean", "net_packets_per_s_mean", "net_bytes_total")


class _Off:
    """A step timer that measures nothing (`--telemetry off`)."""

    def start(self) -> None: ...

    def mark(self, phase: str) -> None: ...

    def end_step(self) -> None: ...

    def finish(self) -> list:
        return []


def telemetry_dir(record: RunRecord):
    return record.path("telemetry")


class Accounting:
    def __init__(self, config: TrainConfig, record: RunRecord, ranks: Ranks):
        self.config, self.record, self.ranks = config, record, ranks
        self.enabled = config.telemetry == "on"
        self.readiness: GradientReadiness | None = None  # armed for one step only (see watch_gradients)
        self.gradients: dict | None = None
        self.sampler = None
        self.timer = StepTimer(ranks.device) if self.enabled else _Off()
        self.counter: comm.ByteCounter | None = None
        self.ddp = None
        self.events = EventLog.open(config, record, ranks)  # --tensorboard: None unless on, and rank 0
        if self.enabled:
            # A GPU shared by several local ranks is read by the first of them only: energy counted once.
            shared = ranks.device.type == "cuda" and ranks.local_rank >= torch.cuda.device_count()
            cuda = ranks.device.index if ranks.device.type == "cuda" and not shared else None
            interfaces = run_interfaces(os.environ.get("MASTER_ADDR"), ranks.local_world_size, ranks.world_size)
            self.sampler = ResourceSampler(
                telemetry_dir(record) / f"rank{ranks.rank}.csv", config.sample_interval, rank=ranks.rank,
                local_rank=ranks.local_rank, host_level=ranks.local_rank == 0, run_interfaces=interfaces,
                cuda_index=cuda).start()

    def attach(self, ddp: torch.nn.parallel.DistributedDataParallel, counter: comm.ByteCounter | None) -> None:
        """Count what the trainer's comm hook hands over (`counter`, None when not counted) and read DDP's own
        timers; the hook itself is the trainer's choice (comm.register with `count=self.enabled`)."""
        self.counter = counter
        if self.enabled and hasattr(ddp, "_get_ddp_logging_data"):  # a private API: absent means no DDP times
            ddp._set_ddp_runtime_logging_sample_rate(DDP_SAMPLE_EVERY)
            self.ddp = ddp

    def watch_gradients(self, model: torch.nn.Module, steps_per_epoch: int) -> None:
        """Rank 0 with telemetry on: time gradient readiness in one backward pass of the first epoch this
        process trains — its 3rd step, or its last when it has fewer — written to gradients.json at the end of
        that epoch. The hooks are on for that step only, so every other step runs as it would untimed."""
        if self.enabled and self.ranks.is_main and steps_per_epoch > 0:
            self.readiness = GradientReadiness(model, self.ranks.device)
            # what DDP broadcasts from rank 0 at every forward (BatchNorm statistics): a forecast's message too
            self.buffer_bytes = sum(buffer.numel() * buffer.element_size() for buffer in model.buffers())
            self.readiness_step = min(TIMED_BACKWARD_STEP, steps_per_epoch) - 1

    # -- during an epoch ---------------------------------------------------------------------------------

    def begin_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_phase("train", epoch + 1)
        self.step, self.comm_bytes, self.comm_calls, self.ddp_samples, self.last_ddp_iteration = 0, 0, 0, [], None
        self.timer.start()

    def before_backward(self) -> None:
        """Right before the step's backward(): arm the readiness hooks when this is the timed step."""
        if self.readiness is not None and self.step == self.readiness_step:
            self.readiness.arm()

    def after_backward(self) -> None:
        """Right after backward() returned: on the timed step, read the ready times and disarm for good."""
        readiness = self.readiness
        if readiness is None or self.step != self.readiness_step:
            return
        end = readiness.mark()  # on the readiness clock, so both times share one timeline
        parameters = readiness.read()  # waits for the device: `end` has happened
        self.gradients = {"bucket_cap_mb": self.config.bucket_cap_mb, "world_size": self.ranks.world_size,
                          "backward_seconds": readiness.since_arm(end), "buffer_bytes": self.buffer_bytes,
                          "parameters": parameters}
        self.readiness = None

    def end_step(self) -> None:
        """After the optimizer: take the step's counted bytes and collective calls; now and then read DDP's
        timers."""
        if self.counter is not None:
            step_bytes, calls = self.counter.take_step()
            self.comm_bytes, self.comm_calls = self.comm_bytes + step_bytes, self.comm_calls + calls
        self.timer.end_step()
        self.step += 1
        if self.ddp is not None and (self.step <= DDP_SAMPLE_EVERY or self.step % DDP_SAMPLE_EVERY == 0):
            data = self.ddp._get_ddp_logging_data()
            if data.get("iteration") != self.last_ddp_iteration and DDP_TIMES["ddp_comm"] in data:
                self.last_ddp_iteration = data.get("iteration")
                self.ddp_samples.append({name: data[key] / 1e9 for name, key in DDP_TIMES.items() if key in data})

    def live(self) -> str:
        """CPU % and network MB/s of the latest sample, for the progress bar."""
        if self.sampler is None or not self.sampler.latest:
            return ""
        latest = self.sampler.latest
        text = f"CPU {latest['process_cpu_percent']:.0f}%"
        if latest.get("net_bytes_per_s") is not None:
            text += f"  net {latest['net_bytes_per_s'] / 1e6:.1f} MB/s"
        return text

    def end_epoch(self, epoch: int) -> dict:
        """The epoch's figures over all ranks, for epochs.csv (collective: every rank calls it)."""
        steps = self.timer.finish()
        if self.sampler is not None:
            self.sampler.set_phase("eval", epoch + 1)
        if not self.enabled:
            return {}
        if self.gradients is not None:
            self.record.write_gradients(self.gradients)
        self.readiness = self.gradients = None  # only the first epoch this process trains is timed
        mine = {"steps": steps, "comm_bytes": self.comm_bytes, "comm_calls": self.comm_calls, "ddp": self.ddp_samples,
                "resources": self.sampler.summary("train", epoch=epoch + 1)}
        everyone = world.gather(mine, self.ranks)
        pooled = [step for rank in everyone for step in rank["steps"]]
        figures = epoch_figures(pooled) | {"steps": len(steps)} | epoch_medians([rank["steps"] for rank in everyone])
        comm_bytes = sum(rank["comm_bytes"] for rank in everyone)
        figures["comm_bytes"] = comm_bytes
        figures["comm_bytes_per_step"] = comm_bytes / (len(pooled) or 1)
        # collectives per step per rank: under the allreduce hook, DDP's gradient buckets (one rank: none)
        figures["comm_calls_per_step"] = sum(rank["comm_calls"] for rank in everyone) / (len(pooled) or 1)
        samples = [sample for rank in everyone for sample in rank["ddp"]]
        for name in DDP_TIMES:
            values = [s[name] for s in samples if name in s]
            figures[f"{name}_mean_s"] = sum(values) / len(values) if values else None
        figures["ddp_samples"] = len(samples)
        resources = combine_ranks([rank["resources"] for rank in everyone])
        return figures | {key: resources[key] for key in EPOCH_RESOURCES}

    # -- at the end --------------------------------------------------------------------------------------

    def summary(self, history: list[dict]) -> dict:
        """The run's accounting figures for summary.json (collective: every rank calls it)."""
        if self.sampler is not None:
            self.sampler.set_phase("finish")
        per_rank = world.gather(self.sampler.summary("train"), self.ranks) if self.enabled else []
        figures = combine_ranks(per_rank)
        figures["step_time_breakdown"] = run_breakdown(history) if self.enabled else None
        figures |= warm_up(history if self.enabled else [])
        figures |= self._communication(history)
        for name in DDP_TIMES:
            rows = [row for row in history if row.get(f"{name}_mean_s") is not None and row.get("ddp_samples")]
            samples = sum(row["ddp_samples"] for row in rows)
            figures[f"{name}_seconds_mean"] = (
                sum(row[f"{name}_mean_s"] * row["ddp_samples"] for row in rows) / samples if samples else None)
        return figures

    def _communication(self, history: list[dict]) -> dict:
        world = self.ranks.world_size
        figures = {"comm_hook": self.config.comm_hook if world > 1 else None, "comm_bytes_per_step": None,
                   "comm_bytes_total": None, "comm_ring_bytes_per_step_formula": None}
        rows = [row for row in history if row.get("comm_bytes") is not None and row.get("steps")]
        if not self.enabled or not rows:
            return figures
        total = sum(row["comm_bytes"] for row in rows)
        per_step = total / (sum(row["steps"] for row in rows) * world)
        figures.update(comm_bytes_per_step=per_step, comm_bytes_total=total,
                       comm_ring_bytes_per_step_formula=comm.ring_bytes_sent_per_rank(per_step, world))
        return figures

    def stop(self) -> None:
        try:
            if self.sampler is not None:
                self.sampler.stop()
        finally:
            if self.events is not None:  # after the sampler: its series is complete
                self.events.close()
