"""Gradient communication: the DDP comm hook a run uses, and the exact bytes it hands to the collective.

`--comm-hook` picks one of torch's own hooks (allreduce, fp16, bf16, powersgd). With accounting on, the hook
is wrapped by a counting hook. What a hook sends cannot be read off the gradient bucket — fp16 sends half of
it, PowerSGD sends its P and Q factors and the tensors it leaves uncompressed, and issues its second
allreduce from a callback on another thread — so the bytes are counted where they are handed over: at
`torch.distributed.all_reduce`, which every one of these hooks calls. The tap counts only while a counting
hook has armed it during this rank's backward pass, and the trainer disarms it after `backward()` returns
(DDP has waited for every bucket's future by then), so the run's own collectives are never counted.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

COMM_HOOKS = ("allreduce", "fp16", "bf16", "powersgd")
POWERSGD_START_ITERATION = 2  # the first step allreduces uncompressed (PowerSGD needs > 1 for error feedback)


class ByteCounter:
    """Bytes handed to the collective by this rank's comm hook, per step."""

    def __init__(self):
        self.lock = threading.Lock()
        self.armed = False
        self.bytes = 0
        self.calls = 0

    def add(self, tensor: torch.Tensor) -> None:
        with self.lock:
            if self.armed:
                self.bytes += tensor.numel() * tensor.element_size()
                self.calls += 1

    def take(self) -> int:
        """The bytes of the step that just ended; disarms the tap until the next hook call."""
        return self.take_step()[0]

    def take_step(self) -> tuple[int, int]:
        """(bytes, collective calls) of the step that just ended; disarms the tap. Under the allreduce hook a
        step makes one call per DDP gradient bucket, so the calls show how --bucket-cap-mb bucketed it."""
        with self.lock:
            counted, calls, self.bytes, self.calls, self.armed = self.bytes, self.calls, 0, 0, False
            return counted, calls


_counters: list[ByteCounter] = []


def _install_tap() -> None:
    """Route torch.distributed.all_reduce through a counting wrapper, once per process."""
    original = dist.all_reduce
    if getattr(original, "_distcnn_tap", False):
        return

    @functools.wraps(original)
    def all_reduce(tensor, *args, **kwargs):
        for counter in _counters:
            counter.add(tensor)
        return original(tensor, *args, **kwargs)

    all_reduce._distcnn_tap = True
    dist.all_reduce = all_reduce


def _hook_and_state(name: str, powersgd_rank: int):
    if name == "allreduce":
        return default_hooks.allreduce_hook, None
    if name == "fp16":
        return default_hooks.fp16_compress_hook, None
    if name == "bf16":
        return default_hooks.bf16_compress_hook, None
    state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=powersgd_rank,
                                        start_powerSGD_iter=POWERSGD_START_ITERATION)
    if dist.get_backend() == "gloo":
        return one_bucket_at_a_time(powerSGD_hook.powerSGD_hook), state
    return powerSGD_hook.powerSGD_hook, state


def one_bucket_at_a_time(hook):
    """PowerSGD issues each bucket's second allreduce from a callback thread; with several buckets on gloo the
    ranks then issue their collectives in different orders and gloo aborts on mismatched sizes (torch does
    not support PowerSGD on gloo: pytorch/pytorch#58467). Waiting for each bucket's whole chain before DDP
    hands over the next keeps the order the same on every rank, at the cost of overlapping that chain with
    the rest of the backward pass."""

    @functools.wraps(hook)
    def serialized(state, bucket):
        future = hook(state, bucket)
        future.wait()
        return future

    return serialized


def register(ddp: torch.nn.parallel.DistributedDataParallel, name: str, count: bool,
             powersgd_rank: int = 1, wrap=None) -> ByteCounter | None:
    """Register hook `name` on a DDP model; with `count`, wrapped so its bytes are counted (returns the counter).
    `wrap(hook) -> hook`: what the forecast's profile puts around the hook to time it.

    Without counting, `allreduce` keeps DDP's built-in C++ allreduce (the same arithmetic, no Python hook)."""
    hook, state = _hook_and_state(name, powersgd_rank)
    hook = wrap(hook) if wrap is not None else hook
    if not count:
        if name != "allreduce":
            ddp.register_comm_hook(state, hook)
        return None
    counter = ByteCounter()
    _counters.append(counter)
    _install_tap()

    def counting_hook(hook_state, bucket):
        with counter.lock:
            counter.armed = True
        return hook(hook_state, bucket)

    ddp.register_comm_hook(state, counting_hook)
    return counter


def gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of all gradients of a model: what plain allreduce hands over per step."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def ring_bytes_sent_per_rank(bytes_per_step: float, world_size: int) -> float:
    """Ring allreduce: each rank sends (and receives) 2(N-1)/N of the buffer (a formula, not a measurement)."""
    return 2 * (world_size - 1) / world_size * bytes_per_step
