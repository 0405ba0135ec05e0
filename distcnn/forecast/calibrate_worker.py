"""The collective benchmark every rank of a calibration runs: `python -m distcnn.forecast.calibrate_worker DIR`.

Started by torchrun (or an emulated host's node agent) like a training rank, on DIR/config.json's ranks and
devices. It measures, with the backend training would use:
- DDP gradient buckets of float32 from 4 KiB up to `max_bytes` (DIR/request.json): a backward pass over
  parameters whose gradients cost nothing, one parameter per bucket, through the counted allreduce hook a
  run uses, while a compute loop runs beside them as backward would; the median seconds per bucket of
  `repeats` passes after the warm-up, per size (four buckets a pass; two where the last size measured says
  a bucket takes over LONG_BUCKET_S: its bytes dominate it, and four would spend seconds measuring the same);
  then the same with nothing computing beside them: a bucket the rank waits for (sent after backward) has
  the cores the compute loop took;
- PowerSGD's per-bucket chain (three allreduces, one after another, from callbacks) on 64-row matrices, beside
  the compute loop and alone;
- the compute slowdown: a conv loop on every rank, then while another thread sends allreduces of the
  largest bucket size measured: compute seconds lost per byte the rank sent meanwhile; and while it sends
  allreduces of 4 KiB: compute seconds lost per message beyond its bytes.
Rank 0 writes DIR/calibration.json.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distcnn import comm, ownership
from distcnn.config import TrainConfig
from distcnn.parallel import world
from distcnn.parallel.ranks import Ranks
from distcnn.record import RunRecord, write_json

SMALLEST = 4096
COMM_SECONDS = 0.5  # how long the compute loop runs beside allreduces
BUCKETS = 4  # buckets per timed backward pass
LONG_BUCKET_S = 0.05  # a bucket expected to take longer is timed two a pass
CHAIN_BYTES = 256 * 2**10  # PowerSGD buckets timed: 64 x 1024 float32 each
WARMUP = 2


def sizes(max_bytes: int) -> list[int]:
    found, size = [], SMALLEST
    while size <= max_bytes:
        found.append(size)
        size *= 4
    return found


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_allreduce(buffer: torch.Tensor, repeats: int, device: torch.device) -> float:
    """Median seconds of one plain allreduce of `buffer` (the slowest rank's)."""
    dist.all_reduce(buffer)  # warm-up: connections, buffers
    sync(device)
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        sync(device)
        seconds.append(time.perf_counter() - start)
    return world.all_reduce_max(statistics.median(seconds), parallel_ranks(device))


class Buckets(nn.Module):
    """`count` parameters of `size` bytes each, whose gradients cost next to nothing to compute: a backward
    pass of DDP over them is `count` buckets of communication, one after another, and nothing else."""

    def __init__(self, size: int, count: int, device: torch.device, rows: int = 1):
        super().__init__()
        shape = (rows, size // 4 // rows) if rows > 1 else (size // 4,)
        self.weights = nn.ParameterList(nn.Parameter(torch.zeros(shape, device=device)) for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum((weight * x).sum() for weight in self.weights)


def time_buckets(size: int, repeats: int, device: torch.device, count: int = BUCKETS, hook: str = "allreduce",
                 rows: int = 1, busy: bool = True) -> float:
    """Median seconds per DDP gradient bucket of `size` bytes, through the same path a run's buckets take
    (DDP's reducer, the counted hook, the futures it waits for): with allreduce what the model's α and B_eff
    are; with powersgd (on `rows` × n matrices, which it compresses) its chain of three allreduces. `busy`: with
    the compute loop beside them, as while backward computes; else alone, as after it."""
    module = Buckets(size, count, device, rows)
    ddp = DistributedDataParallel(module, bucket_cap_mb=size / 2**20)  # one parameter per bucket
    comm.register(ddp, hook, count=True)
    x = torch.ones((), device=device)
    seconds = []
    repeats = repeats * 3 if size <= 256 * 2**10 else repeats  # small ones are cheap and noisier
    warmup = WARMUP + (comm.POWERSGD_START_ITERATION if hook == "powersgd" else 0)
    with Busy(device) if busy else contextlib.nullcontext():  # the rank computes while its buckets are sent
        for step in range(warmup + repeats):
            dist.barrier()
            start = time.perf_counter()
            ddp(x).backward()
            sync(device)
            if step >= warmup:  # DDP builds its buckets at step 1 and rebuilds them after it
                seconds.append((time.perf_counter() - start) / count)
            module.zero_grad(set_to_none=True)
    return world.all_reduce_max(statistics.median(seconds), parallel_ranks(device))


class Busy:
    """The compute loop in a thread of its own while the block runs: in a training step the rank's backward
    computes while the buckets are sent, and the collective's threads compete with it for the cores."""

    def __init__(self, device: torch.device):
        self.device, self.stop = device, threading.Event()

    def __enter__(self):
        def work():
            while not self.stop.is_set():
                compute_loop(self.device, 1)

        self.thread = threading.Thread(target=work, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def parallel_ranks(device: torch.device) -> Ranks:
    return Ranks(dist.get_rank(), 0, dist.get_world_size(), 1, device, dist.get_backend())


def compute_loop(device: torch.device, iterations: int) -> float:
    """Seconds of `iterations` convolutions like a small CNN's (forward and backward-like work)."""
    x = torch.randn(32, 32, 28, 28, device=device)
    weight = torch.randn(32, 32, 3, 3, device=device)
    sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        torch.nn.functional.conv2d(x, weight, padding=1)
    sync(device)
    return time.perf_counter() - start


def slowdown(device: torch.device, max_bytes: int) -> dict:
    """Compute seconds lost per byte sent while allreduces of `max_bytes` (the largest bucket measured) run
    beside the compute loop, and per message while allreduces of the smallest size do (what a message costs
    the CPU beyond its bytes)."""
    ranks = parallel_ranks(device)
    iterations = 4
    while compute_loop(device, iterations) < 0.05:
        iterations *= 2
    iterations = int(world.all_reduce_max(float(iterations), ranks))
    alone = statistics.median(compute_loop(device, iterations) for _ in range(3))
    n = dist.get_world_size()
    large = lost_beside(device, max_bytes, iterations, alone, max_calls=50)
    per_byte = world.all_reduce_max(large["lost_s"] / (large["calls"] * 2 * (n - 1) / n * max_bytes), ranks)
    small = lost_beside(device, SMALLEST, iterations, alone, max_calls=400)
    per_message = (small["lost_s"] - per_byte * small["calls"] * 2 * (n - 1) / n * SMALLEST) / small["calls"]
    per_message = world.all_reduce_max(max(0.0, per_message), ranks)
    return {"slowdown_s_per_byte": per_byte, "slowdown_s_per_message": per_message, "compute_alone_s": alone,
            "loops": large["loops"], "calls": large["calls"], "elapsed_s": large["elapsed_s"]}


def lost_beside(device: torch.device, size: int, iterations: int, alone: float, max_calls: int) -> dict:
    """Compute seconds the loop loses while another thread sends allreduces of `size` bytes for about
    COMM_SECONDS (every rank the same number of calls)."""
    buffer = torch.ones(size // 4, device=device)
    # the same (the slowest rank's) on every rank: the same count; a large one takes half a second, once is enough
    one = time_allreduce(buffer, 3 if size <= 2**20 else 1, device)
    calls, done = min(max_calls, max(2, round(COMM_SECONDS / max(one, 1e-6)))), threading.Event()

    def communicate():
        for _ in range(calls):
            dist.all_reduce(buffer)
            sync(device)
        done.set()

    dist.barrier()
    thread = threading.Thread(target=communicate, daemon=True)
    start = time.perf_counter()
    thread.start()
    loops = 0
    while not done.is_set():
        compute_loop(device, iterations)
        loops += 1
    thread.join()
    elapsed = time.perf_counter() - start
    lost = max(0.0, elapsed - loops * alone)  # beyond what those loops take alone
    return {"lost_s": lost, "calls": calls, "loops": loops, "elapsed_s": elapsed}


def main(argv: list[str]) -> int:
    ownership.die_with_parent()
    folder = Path(argv[0])
    config = TrainConfig(**RunRecord(folder).read_config())
    request = json.loads((folder / "request.json").read_text())
    ranks = world.setup(config)
    try:
        measured = {}
        for busy, name in ((True, ""), (False, "idle_")):
            points = []
            for size in sizes(request["max_bytes"]):
                expected = points[-1][1] * size / points[-1][0] if points else 0.0  # bytes dominate large ones
                count = BUCKETS if expected < LONG_BUCKET_S else 2
                points.append([size, time_buckets(size, request["repeats"], ranks.device, count=count, busy=busy)])
            # PowerSGD's chain of three small allreduces per bucket (its factors of 64-row matrices, rank 1)
            chain = time_buckets(CHAIN_BYTES, request["repeats"], ranks.device, hook="powersgd", rows=64, busy=busy)
            measured |= {f"{name}points": points, f"powersgd_bucket_{name}s": chain}
        measured |= {"powersgd_bucket_bytes": CHAIN_BYTES,
                    "ranks": ranks.world_size, "backend": ranks.backend,
                    "hosts": world.gather_hosts(ranks)} | slowdown(ranks.device, points[-1][0])
        if ranks.is_main:
            write_json(folder / "calibration.json", measured)
        world.barrier(ranks)
    finally:
        world.teardown(ranks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
