"""The batched backend as a device sees it: the aten ops one forward dispatches. On a GPU an op that reads a
tensor's value on the host waits for every kernel queued before it, and a sequence of ops that depends on what
the images drew makes torch.compile trace (and a CUDA graph capture) a different program per batch. So the
recorded sequence must contain no such op, and must be the same for any batch size and any draws."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distcnn.augment import POLICIES, BatchedAugment, Op, Policy, Slot, each, sample_draws

# Ops whose result the host must read before it can go on (values become Python numbers or decide a shape), and
# lift_fresh: a tensor made from host data, which on a GPU is a blocking copy to the device.
HOST_SYNC = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "nonzero_static", "masked_select",
             "bincount", "histc", "_unique", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave",
             "lift_fresh", "allclose"}


class Recorder(TorchDispatchMode):
    """The aten ops dispatched inside the mode, by name, and whether any indexes with a bool mask (which asks
    the host for the number of true elements)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.kernels = 0  # the ops that compute something (views only reinterpret memory)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("index", "index_put", "index_put_"):
            indices = args[1] if len(args) > 1 else kwargs["indices"]
            if any(i is not None and i.dtype == torch.bool for i in indices):
                self.ops.append("bool-mask indexing")
        self.ops.append(str(func))
        self.kernels += not func.is_view
        return func(*args, **(kwargs or {}))


def record(augment: BatchedAugment, n: int, seed: int) -> Recorder:
    x = torch.rand(n, augment.channels, 32, 32, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    with Recorder() as recorder:
        augment(x)
    return recorder


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("policy", POLICIES)
def test_forward_dispatches_the_same_ops_whatever_was_drawn_and_never_waits(policy, channels):
    augment = BatchedAugment(policy, channels, 32)
    augment(torch.rand(2, channels, 32, 32))  # first call: the sampler's per-policy tables are made once
    runs = [record(augment, n, seed) for n, seed in ((8, 0), (64, 0), (64, 1), (8, 2))]
    for run in runs:
        waits = {op.removeprefix("aten.").rsplit(".", 1)[0] for op in run.ops} & (HOST_SYNC | {"bool-mask indexing"})
        assert not waits, f"ops that read device values on the host: {sorted(waits)}"
    for run in runs[1:]:
        assert run.ops == runs[0].ops
    print(f"{policy} on {channels} channel(s): {runs[0].kernels} kernels, {len(runs[0].ops)} aten ops")
    budget = {"none": 0, "flip-crop": 45, "paper": 145, "trivialaugment": 235, "randaugment": 435}[policy]
    assert runs[0].kernels <= budget  # 40, 116 / 130, 197 / 214, 365 / 397 on 1 / 3 channels (torch 2.14)


@pytest.mark.parametrize("policy", [name for name in POLICIES if name != "none"])
def test_forward_runs_on_the_meta_device(policy):
    """Meta tensors have shapes but no values: any op that reads one (item, tolist, nonzero...) fails there."""
    out = BatchedAugment(policy, 3, 32)(torch.rand(16, 3, 32, 32, device="meta"))
    assert out.shape == (16, 3, 32, 32) and out.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", [name for name in POLICIES if name != "none"])
def test_forward_never_synchronises_a_cuda_device(policy):
    """CUDA's own check: any call that waits for the device (a copy to or from the host included) raises."""
    augment = BatchedAugment(policy, 3, 32)
    x = torch.rand(64, 3, 32, 32, device="cuda")
    augment(x)  # the sampler's per-policy tables go to the device once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        augment(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_an_op_that_cannot_be_drawn_dispatches_nothing():
    rotate = Op("rotate", high=10.0, signed=True)
    never = (Op("brightness", high=0.5, signed=True, p=0.0), Op("equalize", p=0.0), Op("shear_x", high=0.2, p=0.0))
    bare = BatchedAugment(Policy("bare", (Slot((rotate, Op("identity"))),)), 3, 32)
    padded = BatchedAugment(Policy("padded", (Slot((rotate, Op("identity")) + never),) + each(*never)), 3, 32)
    x = torch.rand(8, 3, 32, 32)

    def ops(augment):
        draws = sample_draws(augment.policy, 8)
        with Recorder() as recorder:
            augment.apply_draws(x, draws)
        return recorder.ops

    assert ops(padded) == ops(bare)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile needs a C++ compiler")
@pytest.mark.parametrize("policy", ["paper", "trivialaugment"])
@pytest.mark.slow
def test_compiled_batched_path_gives_the_eager_images(policy):
    """One graph (fullgraph=True) that does not depend on the draws: new draws do not recompile."""
    torch.manual_seed(0)
    augment = BatchedAugment(policy, 3, 32)
    x = torch.rand(8, 3, 32, 32)
    compiled = torch.compile(augment.apply_draws, fullgraph=True)
    first = sample_draws(augment.policy, 8)
    assert (compiled(x, first) - augment.apply_draws(x, first)).abs().max() < 1e-5
    second = sample_draws(augment.policy, 8)
    with torch.compiler.set_stance("fail_on_recompile"):
        got = compiled(x, second)
    assert (got - augment.apply_draws(x, second)).abs().max() < 1e-5
