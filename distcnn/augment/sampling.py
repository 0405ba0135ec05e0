"""The shared sampler: per-image draws for a policy (`sample_draws`), and what both backends plan from a policy
(its slots grouped so that consecutive geometric slots cost one resampling; a name or Policy resolved for the
images' channels)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from distcnn.augment.kinds import KINDS
from distcnn.augment.ops import _UNIFORMS
from distcnn.augment.policies import Policy, get_policy
from distcnn.augment.spec import Slot
from distcnn.errors import UsageError


class Draws(NamedTuple):
    """What a policy drew for n images: per image and slot the op index (-1: none) and its uniform numbers."""

    choice: Tensor  # (n, slots) int64
    u: Tensor  # (n, slots, _UNIFORMS) float32: uniform in [0, 1), except [..., 2], a random sign +-1


def sample_draws(policy: Policy, n: int, device: torch.device | str | None = None) -> Draws:
    """Per-image draws from torch's global RNG of `device` (the trainer seeds it per rank, DataLoader per worker)."""
    u = torch.rand(n, len(policy.slots), _UNIFORMS, device=device)
    u[..., 2] = u[..., 2].lt(0.5).mul(-2.0).add(1.0)  # one sign per image and slot for the signed ops
    if not policy.slots:
        return Draws(torch.zeros(n, 0, dtype=torch.long, device=u.device), u)
    counts, probs = _slot_tables(policy, u.device)
    choice = (u[..., 0] * counts).long().clamp_max_(counts - 1)
    p = probs.gather(1, choice.t()).t()
    return Draws(torch.where(u[..., 1] < p, choice, -1), u)


@functools.lru_cache(maxsize=64)
def _slot_tables(policy: Policy, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per slot: how many ops it holds, and each op's probability (padded with 0)."""
    width = max(len(s.ops) for s in policy.slots)
    counts = torch.tensor([len(s.ops) for s in policy.slots], device=device)
    probs = torch.tensor([[op.p for op in s.ops] + [0.0] * (width - len(s.ops)) for s in policy.slots], device=device)
    return counts, probs


@dataclass(frozen=True)
class _Group:
    """Slots applied together: a run of geometric-only slots (composed into one warp), or one other slot."""

    slots: tuple[int, ...]
    always_moves: bool  # some slot always applies a geometric op: every image is warped


def _plan(policy: Policy) -> tuple[_Group, ...]:
    """Group the slots: geometric maps compose, so a run of geometric-only slots costs one resampling."""

    def geometric(slot: Slot) -> bool:
        return all(KINDS[op.kind].geometric for op in slot.ops)

    def always(slot: Slot) -> bool:
        return len(slot.ops) == 1 and geometric(slot) and slot.ops[0].p >= 1.0

    groups: list[list[int]] = []
    for i, slot in enumerate(policy.slots):
        if i > 0 and geometric(slot) and geometric(policy.slots[i - 1]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return tuple(_Group(tuple(g), any(always(policy.slots[i]) for i in g)) for g in groups)


def _resolve(policy: Policy | str, channels: int, image_size: int) -> Policy:
    if channels not in (1, 3):
        raise UsageError(f"augmentation needs 1- or 3-channel images, got {channels} channels")
    if image_size < 3:
        raise UsageError(f"augmentation needs images of at least 3x3 pixels, got {image_size}")
    return (get_policy(policy) if isinstance(policy, str) else policy).for_channels(channels)
