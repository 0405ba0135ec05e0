"""The per-sample backend (`PerSampleAugment`): one uint8 image at a time in a DataLoader worker, through
`torchvision.transforms.v2.functional`. The composed map goes through `v2.functional.perspective` (an affine map
is a perspective with a zero last row), so both backends resample each image once, bilinearly, with zero fill,
at the same coordinates; colour ops are torchvision's functionals with the drawn factors. `augment_many` takes a
worker's whole batch of images: one draw and one parameter computation for all of them, then torchvision image
by image.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from distcnn.augment.kinds import KINDS
from distcnn.augment.ops import Affine, Entry, Kind
from distcnn.augment.policies import Policy
from distcnn.augment.sampling import Draws, _plan, _resolve, sample_draws


class PerSampleAugment:
    """A policy on uint8 images (C, H, W) one at a time, for DataLoader workers (picklable; torchvision v2).

    Each image is converted to float [0, 1], augmented with the same kind of draws and the same parameter code as
    the batched backend, and rounded back to uint8 at the end. Draws come from torch's global RNG in the worker
    process, which DataLoader seeds per worker. `augment_many` is for a Dataset's __getitems__, which gets a
    worker's whole batch of indices: it draws and computes the parameters for all of those images at once. Per
    image those dozens of tiny tensor ops cost more than torchvision's own work: `paper` on 1x28x28 (1 thread)
    takes 150 us per image through augment_many of 128, 530 through __call__ (torchvision's own v2 pipeline for
    the recipe: 570)."""

    def __init__(self, policy: Policy | str, channels: int, image_size: int):
        self.policy = _resolve(policy, channels, image_size)
        self.channels, self.image_size = channels, image_size
        self._groups = _plan(self.policy)

    def __repr__(self) -> str:
        return f"PerSampleAugment(policy={self.policy.name!r}, channels={self.channels}, image_size={self.image_size})"

    def __call__(self, image: Tensor) -> Tensor:
        if image.ndim != 3 or image.shape[0] != self.channels or image.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 image ({self.channels}, H, W), got {tuple(image.shape)} {image.dtype}")
        if not self.policy.slots:
            return image
        return self._augment(image.unsqueeze(0), sample_draws(self.policy, 1))[0]

    def augment_many(self, images: Tensor, draws: Draws | None = None) -> Tensor:
        """uint8 (B, C, H, W) -> uint8 (B, C, H, W), each image with its own draw, as B calls would give: one
        sample_draws for all, then torchvision image by image. `draws` (one row per image) replaces the sampled
        ones."""
        if images.ndim != 4 or images.shape[1] != self.channels or images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images (B, {self.channels}, H, W), got {tuple(images.shape)} "
                             f"{images.dtype}")
        if not self.policy.slots or images.shape[0] == 0:
            return images
        return self._augment(images, sample_draws(self.policy, images.shape[0]) if draws is None else draws)

    @torch.no_grad()
    def apply_draws(self, x: Tensor, draws: Draws, index: int = 0) -> Tensor:
        """Apply row `index` of `draws` to one float image (C, H, W) in [0, 1]. The parameters are computed for
        every row, as augment_many does, so that both give the same image for the same draws."""
        return self._apply(x, self._steps(draws, *x.shape[-2:])[index])

    @torch.no_grad()
    def _augment(self, images: Tensor, draws: Draws) -> Tensor:
        """uint8 (B, C, H, W) through float [0, 1], image by image, and back."""
        x = TF.to_dtype(images, torch.float32, scale=True)
        out = torch.empty_like(images)
        for i, steps in enumerate(self._steps(draws, *images.shape[-2:])):
            # Round to the nearest level (to_dtype truncates 255.999 x: about half a level darker on average).
            out[i] = self._apply(x[i], steps).mul_(255).round_()
        return out

    def _steps(self, draws: Draws, height: int, width: int) -> list[list[Affine | tuple[Kind, float]]]:
        """Per image, what it applies, in order: (colour kind, value) pairs and, after each group of slots that
        moves it, the group's composed map, all in Python numbers. Each op that some image drew has its parameters
        computed once for all images by the kinds' tensor code, and the per-image numbers among them are read out
        in one go: per image, only the composition and torchvision remain."""
        choice = draws.choice.tolist()
        columns: list[Tensor] = []  # per-image numbers, (n,) each

        def entry(e: Entry) -> float | int:
            """A number shared by all images stays a (float) number; per-image ones become their column's (int)."""
            if not isinstance(e, Tensor):
                return float(e)
            columns.append(e.float())
            return len(columns) - 1

        params: dict[tuple[int, int], tuple[Kind, list[float | int]]] = {}  # (slot, op) -> its kind, entries
        for s, j in sorted({(s, j) for picks in choice for s, j in enumerate(picks) if j >= 0}):
            op = self.policy.slots[s].ops[j]
            kind = KINDS[op.kind]
            u = draws.u[:, s]
            if kind.geometric:
                params[s, j] = kind, [entry(e) for e in kind.matrix(op, u, height, width)]
            elif not kind.noop:
                params[s, j] = kind, [entry(kind.value(op, u))]
        numbers = torch.stack(columns, 1).tolist() if columns else [[]] * len(choice)
        steps: list[list[Affine | tuple[Kind, float]]] = []
        for picks, row in zip(choice, numbers):
            image_steps: list[Affine | tuple[Kind, float]] = []
            for group in self._groups:
                affine = None
                for s in group.slots:
                    if (s, picks[s]) not in params:
                        continue
                    kind, entries = params[s, picks[s]]
                    values = [row[e] if isinstance(e, int) else e for e in entries]
                    if kind.geometric:
                        affine = Affine(*values) if affine is None else affine.then(Affine(*values))
                    else:
                        image_steps.append((kind, values[0]))
                if affine is not None:
                    image_steps.append(affine)
            steps.append(image_steps)
        return steps

    @staticmethod
    def _apply(x: Tensor, steps: list[Affine | tuple[Kind, float]]) -> Tensor:
        for step in steps:
            x = _transform_one(x, step) if isinstance(step, Affine) else step[0].per_sample(x, step[1])
        return x


def _transform_one(x: Tensor, affine: Affine) -> Tensor:
    """One image through a forward map: bilinear, zero fill, via torchvision's perspective. A flip and/or
    whole-pixel shift (all of flip-crop) is done exactly by flip and crop instead: the same pixels as resampling,
    at a fraction of the cost, so that the per-sample backend is not made slower than torchvision's own."""
    height, width = x.shape[-2:]
    a, b, tx, c, d, ty = (float(e) for e in affine)
    if b == 0 and c == 0 and d == 1 and a in (1, -1) and tx.is_integer() and ty.is_integer():
        x = TF.horizontal_flip(x) if a == -1 else x
        return TF.crop(x, -int(ty), -int(tx), height, width)  # v2's crop pads with zeros outside the image
    # perspective's coefficients map output to input in pixel-corner coordinates (origin at the top-left
    # corner): the inverse map, moved from the image centre to the corner.
    ia, ib, itx, ic, id_, ity = (float(e) for e in Affine(a, b, tx, c, d, ty).inverse())
    cx, cy = width / 2, height / 2
    coefficients = [ia, ib, itx + cx - ia * cx - ib * cy, ic, id_, ity + cy - ic * cx - id_ * cy, 0.0, 0.0]
    return TF.perspective(x, None, None, interpolation=v2.InterpolationMode.BILINEAR, fill=None,
                          coefficients=coefficients)
