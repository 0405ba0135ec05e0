"""How fast one training step runs on its device: precision, memory format and compilation.

Each is a run option and so a study factor (`--precision`, `--memory-format`, `--compile`), because each has a
cost and a benefit that distcnn exists to measure:

- **precision** `fp32 | bf16 | fp16`: mixed precision the usual way, `torch.autocast` around the forward pass
  and the loss (weights, gradients and the optimizer stay fp32); fp16 adds a gradient scaler, because fp16
  gradients underflow. bf16 needs no scaler. Evaluation runs under the same autocast.
- **memory format** `channels-last | contiguous | auto`: the layout of the images and conv weights (NHWC or
  NCHW). `auto` takes the layout measured faster on the device (FASTER_LAYOUT, below).
- **compile** `off | default | reduce-overhead | max-autotune`: `torch.compile` of the model the step trains
  (the DDP-wrapped one on several ranks), with that mode; `reduce-overhead` also captures CUDA graphs, so it
  is for GPUs only. The first compilation is timed on its own (`compile_seconds`), never inside epoch 1.

What cannot work on the device is refused before anything starts, in one line (`check`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import sysconfig
import warnings
from pathlib import Path

import torch

from distcnn.errors import UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The layout `--memory-format auto` takes, per device type and precision: the faster one as measured by
# benchmarks/gpu.py (images/s, same run, side by side; the numbers are in README.md's "Speed" section).
# cpu: 2-core Sapphire Rapids (AMX), torch 2.14, one rank at batch 128: channels-last was faster in every
# pairing measured: fp32 1.33x (simplecnn, 28 px), 1.26x (deepcnn), 1.14x (resnet18, 32 px); bf16 1.52x,
# 1.58x, 1.08x; and in `make demo`'s runs (2 ranks of 1 thread, batch 64) about 1.2x. cuda: not measured by
# distcnn yet (no GPU in reach when this was written); channels-last is what PyTorch's performance guide
# recommends for convolutions on tensor cores, in mixed precision and in TF32/fp32 alike.
FASTER_LAYOUT = {
    ("cpu", "fp32"): "channels-last",
    ("cpu", "bf16"): "channels-last",
    ("cpu", "fp16"): "channels-last",
    ("cuda", "fp32"): "channels-last",
    ("cuda", "bf16"): "channels-last",
    ("cuda", "fp16"): "channels-last",
}


def resolve_layout(choice: str, device_type: str, precision: str) -> str:
    """`channels-last` or `contiguous`: the option itself, or for `auto` the faster one on this device."""
    return FASTER_LAYOUT[(device_type, precision)] if choice == "auto" else choice


def describe(precision: str, memory_format: str, compile_mode: str, device_type: str) -> dict:
    """How a run's step runs, resolved for its device: what environment.json and summary.json record."""
    return {"precision": precision, "memory_format": resolve_layout(memory_format, device_type, precision),
            "compile": compile_mode}


def torch_format(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "channels-last" else torch.contiguous_format


def check(precision: str, compile_mode: str, device_type: str) -> None:
    """Refuse, in one line, a precision or compile mode this device (or this machine) cannot run."""
    if precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--precision bf16: this GPU ({torch.cuda.get_device_name()}) has no bf16 support; "
                         "use --precision fp16 or fp32")
    if precision in ("bf16", "fp16") and device_type == "cpu":
        if not torch.amp.is_autocast_available("cpu"):
            raise UsageError(f"--precision {precision}: this torch build has no CPU autocast; use --precision fp32")
    if compile_mode == "off":
        return
    if compile_mode == "reduce-overhead" and device_type != "cuda":
        raise UsageError("--compile reduce-overhead captures CUDA graphs and needs a GPU; on the CPU use "
                         "--compile default or max-autotune")
    missing = missing_toolchain(device_type)
    if missing:
        raise UsageError(f"--compile {compile_mode}: {missing}; install it or leave out --compile")


def missing_toolchain(device_type: str) -> str | None:
    """What torch.compile (inductor) lacks on this machine for the device, in words; None when nothing."""
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "inductor needs triton for GPU kernels and it is not installed (pip install triton)"
        return None
    from torch._inductor import config as inductor_config

    candidates = inductor_config.cpp.cxx if isinstance(inductor_config.cpp.cxx, (list, tuple)) else (
        inductor_config.cpp.cxx,)
    if not any(name and shutil.which(name) for name in candidates):
        named = " or ".join(name for name in candidates if name) or "g++"
        return f"inductor needs a C++ compiler for CPU kernels and {named} is not on PATH (apt-get install g++)"
    headers = Path(sysconfig.get_path("include")) / "Python.h"
    if not headers.exists():
        return f"inductor needs Python's C headers and {headers} is missing (apt-get install python3-dev)"
    return None


class Precision:
    """Autocast for the forward pass and loss, and the gradient scaler fp16 needs, for one device."""

    def __init__(self, precision: str, device: torch.device):
        self.precision, self.device_type = precision, device.type
        self.dtype = DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        if self.scaler is not None:  # the scaler skips the first steps while it finds its scale: torch then
            # warns that the schedule stepped before the optimizer, which is what the scaler meant to do
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step; with fp16, skipped by the scaler when a gradient overflowed (as torch does)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """`model` compiled with `mode` (the module shares the model's parameters), or the model itself for off."""
    if mode == "off":
        return model
    return torch.compile(model, mode=mode)
