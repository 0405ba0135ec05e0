"""Augmentation policies and their two backends, driven by one policy definition.

A policy (`Policy`, policies.py) is a sequence of slots of ops (`Op`, `Slot`: spec.py). One sampler,
`sample_draws` (sampling.py), draws for every image and slot the op it applies and a few uniform numbers; the op
kinds (ops.py: their base and the geometric ones; colour.py; kinds.py names them) turn those numbers into
parameters with code shared by both backends, which only *apply* them:
**batched** (`BatchedAugment`, batched.py, the default) on whole float batches on the training device, and
**per-sample** (`PerSampleAugment`, per_sample.py) on one uint8 image at a time in DataLoader workers, through
torchvision v2. `build_augment` picks one for a run; MixUp and CutMix (`build_batch_mix`, mix.py) mix batches.

The two are therefore the same distribution by construction, and the same draws give the same image up to float
rounding and the final uint8 quantisation (tests/test_augment.py checks this op by op and policy by policy).

Why not kornia's own auto-augment modules: in kornia 0.9.0 `kornia.augmentation.auto.TrivialAugment` and
`RandAugment` pick their op(s) in `get_forward_sequence` once per forward call, so every image of a batch gets
the same op. distcnn draws the op per image.

Imports go down: spec -> ops -> policies -> sampling -> batched, per_sample -> this package; mix stands apart.
torchvision is imported only where it is used (the per-sample backend, MixUp/CutMix): with it comes torch._dynamo,
1.5 s of CPU at every rank's start.
Nothing inside the package imports this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distcnn.augment.batched import BatchedAugment
from distcnn.augment.mix import BatchMix, build_batch_mix
from distcnn.augment.kinds import KINDS
from distcnn.augment.ops import Affine, Kind, strength
from distcnn.augment.policies import POLICIES, Policy, get_policy, register_policy
from distcnn.augment.sampling import Draws, sample_draws
from distcnn.augment.spec import Op, Slot, choose, each
from distcnn.errors import unknown

if TYPE_CHECKING:
    from distcnn.augment.per_sample import PerSampleAugment

__all__ = [
    "BACKENDS", "KINDS", "POLICIES", "Affine", "BatchMix", "BatchedAugment", "Draws", "Kind", "Op", "PerSampleAugment",
    "Policy", "Slot", "build_augment", "build_batch_mix", "choose", "each", "get_policy", "register_policy",
    "sample_draws", "strength",
]

BACKENDS = ("batched", "per-sample")


def build_augment(policy_name: str, backend: str, channels: int, image_size: int, strength: float = 1.0
                  ) -> BatchedAugment | PerSampleAugment | None:
    """The augmentation of a run: None for `none` (or strength 0), else the policy at `strength` (see
    Policy.scaled) on the chosen backend."""
    policy = get_policy(policy_name).scaled(strength)
    if backend not in BACKENDS:
        raise unknown("augmentation backend", backend, BACKENDS)
    if not policy.slots:
        return None
    if backend == "batched":
        return BatchedAugment(policy, channels, image_size)
    from distcnn.augment.per_sample import PerSampleAugment

    return PerSampleAugment(policy, channels, image_size)


def __getattr__(name: str):
    """PerSampleAugment is imported on first use: it needs torchvision, which a batched run never imports."""
    if name == "PerSampleAugment":
        from distcnn.augment.per_sample import PerSampleAugment

        return PerSampleAugment
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
