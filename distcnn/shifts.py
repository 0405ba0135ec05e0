"""Shifted copies of the test set, made on the fly: how much of its accuracy a model keeps off its training
distribution (`--eval-shift`), in the manner of the CIFAR-10-C corruption benchmark.

Each shift works on float batches in [0, 1] (before normalisation), batched on the evaluation device, at
severities 1..3. The one table of magnitudes, which the code reads (SHIFTS):

    shift         severity 1   2      3      what it does (size: the image side in pixels)
    rotation      10           20     30     rotate by that many degrees, random sign; bilinear, zero fill
    translation   0.05         0.10   0.15   move by p = max(1, round(f × size)) whole pixels in x and in y,
                                             random signs; zero fill
    noise         0.04         0.08   0.12   add Gaussian noise of that standard deviation, clip to [0, 1]
    blur          0.5          1.0    1.5    Gaussian blur of that sigma in pixels (kernel 2·ceil(3σ)+1,
                                             reflected borders)
    contrast      0.6          0.4    0.2    (x − m)·c + m, m each image's mean per channel
    occlusion     0.10         0.20   0.30   a grey (0.5) square of side round(√a × size), about a of the
                                             area, at a random place inside the image

Deterministic: image i of a set is shifted with draws from its own torch.Generator seeded from (seed, shift,
severity, i), so the shifted set is the same whatever the batch size, the rank or the number of ranks. The
trainer passes the split seed: like CIFAR-10-C, the shifted test sets are fixed data, the same for every
replicate and configuration of a study.

`shifts_in_training` says which shifts a policy itself trains on, so a report can keep in-distribution gains
(a rotation-trained model scored on rotated images) apart from out-of-distribution ones: rotate → rotation;
translate, pad-crop, resized crop → translation; contrast → contrast; sharpness (a factor below 1 blends
toward a 3×3 smoothing) → blur; CutMix (pasted patches hide part of the image) → occlusion. Nothing in the
registered policies adds noise.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from distcnn.errors import unknown
from distcnn.summary import SEVERITIES, SHIFT_NAMES

if TYPE_CHECKING:  # the study tables read the shift names without loading torchvision
    from distcnn.augment import Policy

OCCLUDER = 0.5  # the grey of the occluding square


@dataclass(frozen=True)
class ShiftKind:
    """One kind of shift: its magnitude at each severity (the table above), and how it applies one."""

    magnitudes: tuple[float, float, float]
    unit: str
    apply: Callable[[Tensor, float, Tensor, Tensor | None], Tensor]  # (x, magnitude, uniforms (B, 3), noise)
    noisy: bool = False  # needs a standard normal draw per pixel


def _signs(u: Tensor) -> Tensor:
    return torch.where(u < 0.5, -1.0, 1.0)


def _rotation(x, degrees, u, noise):
    angle = (degrees * _signs(u[:, 0])).to(x)
    from kornia.geometry.transform import rotate  # kornia on first use: a run without --eval-shift never imports it

    return rotate(x, angle, mode="bilinear", padding_mode="zeros", align_corners=True)


def translation_pixels(fraction: float, size: int) -> int:
    return max(1, round(fraction * size))


def _translation(x, fraction, u, noise):
    p = translation_pixels(fraction, x.shape[-1])
    shift = (p * torch.stack([_signs(u[:, 0]), _signs(u[:, 1])], dim=1)).to(x)
    from kornia.geometry.transform import translate

    return translate(x, shift, mode="bilinear", padding_mode="zeros", align_corners=True)


def _noise(x, sigma, u, noise):
    return (x + sigma * noise.to(x)).clamp_(0.0, 1.0)


def blur_kernel_size(sigma: float) -> int:
    return 2 * math.ceil(3 * sigma) + 1


def _blur(x, sigma, u, noise):
    k = blur_kernel_size(sigma)
    from kornia.filters import gaussian_blur2d

    return gaussian_blur2d(x, (k, k), (sigma, sigma), border_type="reflect")


def _contrast(x, factor, u, noise):
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean).mul_(factor).add_(mean).clamp_(0.0, 1.0)


def occluder_side(area: float, size: int) -> int:
    return min(size, max(1, round(math.sqrt(area) * size)))


def _occlusion(x, area, u, noise):
    height, width = x.shape[-2:]
    side = occluder_side(area, min(height, width))
    top = (u[:, 0] * (height - side + 1)).floor().clamp_(max=height - side).to(x.device)
    left = (u[:, 1] * (width - side + 1)).floor().clamp_(max=width - side).to(x.device)
    rows = torch.arange(height, device=x.device).view(1, height, 1)
    columns = torch.arange(width, device=x.device).view(1, 1, width)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < top.view(-1, 1, 1) + side)
              & (columns >= left.view(-1, 1, 1)) & (columns < left.view(-1, 1, 1) + side))
    return x.masked_fill(inside.unsqueeze(1), OCCLUDER)


SHIFTS: dict[str, ShiftKind] = {
    "rotation": ShiftKind((10.0, 20.0, 30.0), "degrees", _rotation),
    "translation": ShiftKind((0.05, 0.10, 0.15), "fraction of the side", _translation),
    "noise": ShiftKind((0.04, 0.08, 0.12), "standard deviation", _noise, noisy=True),
    "blur": ShiftKind((0.5, 1.0, 1.5), "sigma in pixels", _blur),
    "contrast": ShiftKind((0.6, 0.4, 0.2), "contrast factor", _contrast),
    "occlusion": ShiftKind((0.10, 0.20, 0.30), "fraction of the area", _occlusion),
}


def parse_shifts(text: str | None) -> list[str]:
    """`rotation,noise` (or `all`) -> the shift names, in the table's order; an unknown one is a UsageError
    naming the nearest."""
    if text is None:
        return []
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(SHIFT_NAMES)
    for name in names:
        if name not in SHIFTS:
            raise unknown("shift", name, (*SHIFT_NAMES, "all"))
    return [name for name in SHIFT_NAMES if name in names]


def _seed(seed: int, name: str, severity: int) -> int:
    """A seed per (seed, shift, severity); crc32 because Python's str hash changes per process."""
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 101 + severity) % (2**62)


class Shift:
    """One shift at one severity: `shift(x, index)` shifts a float batch x (B, C, H, W) in [0, 1] whose rows
    are images `index` (B,) of the set; x is not changed."""

    def __init__(self, name: str, severity: int, seed: int = 0):
        if name not in SHIFTS:
            raise unknown("shift", name, SHIFT_NAMES)
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
        self.name, self.severity, self.kind = name, severity, SHIFTS[name]
        self.magnitude = self.kind.magnitudes[severity - 1]
        self.base_seed = _seed(seed, name, severity)

    def __repr__(self) -> str:
        return f"Shift({self.name!r}, severity={self.severity}, {self.kind.unit} {self.magnitude})"

    def draws(self, index: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
        """Per image: three uniforms, and a standard normal per pixel for noisy shifts, from its own generator."""
        generator = torch.Generator()
        uniforms, noise = [], []
        for i in index.tolist():
            generator.manual_seed((self.base_seed * 1_000_033 + i) % (2**63))
            uniforms.append(torch.rand(3, generator=generator))
            if self.kind.noisy:
                noise.append(torch.randn(shape, generator=generator))
        return torch.stack(uniforms), (torch.stack(noise) if noise else None)

    @torch.no_grad()
    def __call__(self, x: Tensor, index: Tensor) -> Tensor:
        u, noise = self.draws(index, tuple(x.shape[1:]))
        return self.kind.apply(x, self.magnitude, u.to(x.device),
                               noise.to(x.device) if noise is not None else None)


# Which op kinds of a policy train on which shift (see the module docstring).
TRAINED_BY = {"rotate": "rotation", "translate_x": "translation", "translate_y": "translation",
              "pad_crop": "translation", "resized_crop": "translation", "contrast": "contrast", "sharpness": "blur"}


def shifts_in_training(policy: Policy, cutmix: float = 0.0) -> list[str]:
    """The shifts that `policy` (as it runs: scaled, for its channels) or CutMix train on, in table order."""
    trained = {TRAINED_BY[op.kind] for slot in policy.slots for op in slot.ops if op.kind in TRAINED_BY and op.p > 0}
    if cutmix > 0:
        trained.add("occlusion")
    return [name for name in SHIFT_NAMES if name in trained]
