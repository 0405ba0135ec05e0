"""When each parameter's gradient is ready during a backward pass, and how many bytes it is: what DDP's
gradient buckets are made of, and what a forecast of their communication starts from.

DDP rebuilds its buckets after the first iteration in the order the gradients became ready (parameters are
never split across buckets), so the order and the ready times measured here decide which bucket holds what
and when each can be sent. One backward pass is timed at a time (`arm` just before `backward()`, `read` after
it); on a GPU the times are CUDA events on the current stream, read once, so timing adds no synchronisation
inside the pass.
"""

from __future__ import annotations

import time

import torch
from torch import nn


class GradientReadiness:
    """Times the moment every trainable parameter's gradient has been accumulated, relative to `arm`."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.handles: list = []
        self.marks: dict[str, object] = {}

    def arm(self) -> None:
        """Start timing: call right before `backward()`."""
        self.marks = {}
        for name, param in self.params:
            self.handles.append(param.register_post_accumulate_grad_hook(
                lambda _, name=name: self.marks.__setitem__(name, self._now())))
        self.start = self._now()

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self):
        """A moment on the readiness clock (a CUDA event on a GPU), for `since_arm` once `read` has waited."""
        return self._now()

    def since_arm(self, moment) -> float:
        """Seconds from `arm` to a `mark` (after `read`, which waits for the device)."""
        return self.start.elapsed_time(moment) / 1000 if self.cuda else moment - self.start

    def read(self) -> list[dict]:
        """Stop timing; every parameter's name, shape, dtype, bytes and ready time (s after `arm`), in the
        order the gradients became ready (a parameter that got no gradient: ready_s None, last)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.cuda:
            torch.cuda.current_stream().synchronize()
        rows = []
        for name, param in self.params:
            mark = self.marks.get(name)
            ready = None if mark is None else (
                self.start.elapsed_time(mark) / 1000 if self.cuda else mark - self.start)
            rows.append({"name": name, "shape": list(param.shape), "dtype": str(param.dtype).removeprefix("torch."),
                         "bytes": param.numel() * param.element_size(), "ready_s": ready})
        return sorted(rows, key=lambda row: (row["ready_s"] is None, row["ready_s"] or 0.0))
