"""The batched backend (`BatchedAugment`, the default): a whole float batch on the training device, never
waiting for it: nothing is read back to the host, and the ops dispatched depend only on the policy and the
batch's shape, not on what the images drew (so a GPU is not stalled and torch.compile traces one graph).
Consecutive geometric slots (rotation, shear, translation, resized crop, flip) are composed into one affine map
per image and applied by one bilinear warp per batch. Every op of a slot is computed for every image, and each
image keeps what its own draw gives: a geometric op's map (a few numbers per image) is selected per image
before the warp; a colour op that some value leaves exactly as it is (the blends at factor 1, solarize at a
threshold no pixel reaches, autocontrast told not to stretch) gets that value on the images that did not
draw it, and the others (posterize, equalize) are selected per image with torch.where. An image that drew
nothing keeps its pixels bit for bit.

Decisions: plain torch, chosen for what it costs on CPU (batch 128, 2 threads; numbers at each function, and at
the op kinds) and for never reading a value back to the host. The warp is torch's affine_grid and grid_sample
(bilinear, zero fill, align_corners=True: the points kornia's warp_affine with align_corners=True samples, in
fewer ops), one call per batch for all composed geometric ops.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distcnn.augment.kinds import KINDS
from distcnn.augment.ops import Affine, _mul
from distcnn.augment.policies import Policy
from distcnn.augment.sampling import Draws, _Group, _plan, _resolve, sample_draws


class BatchedAugment(nn.Module):
    """A policy on whole float batches (B, C, H, W) in [0, 1] on any device, with per-image random parameters.

    `policy` is a registered name or a Policy; `channels` (1 or 3) selects the ops that apply; `image_size` is
    the run's image size, checked here; the ops themselves scale with the size of the batch they get.

    Nothing here reads a tensor's values on the host, and which ops run depends only on the policy and the
    batch's shape: each op of a slot runs on the whole batch and every image keeps the result of its own draw
    (see Kind.neutral), so `apply_draws` compiles to one graph (torch.compile, fullgraph=True)."""

    def __init__(self, policy: Policy | str, channels: int, image_size: int):
        super().__init__()
        self.policy = _resolve(policy, channels, image_size)
        self.channels, self.image_size = channels, image_size
        self._groups = _plan(self.policy)
        # per slot, the indices of the geometric and of the colour ops it can draw (identity is neither, and an op
        # of probability 0 is never drawn: it costs nothing)
        self._geometric = [[j for j, op in enumerate(s.ops) if op.p > 0 and KINDS[op.kind].geometric]
                           for s in self.policy.slots]
        self._colour = [[j for j, op in enumerate(s.ops)
                         if op.p > 0 and not KINDS[op.kind].geometric and not KINDS[op.kind].noop]
                        for s in self.policy.slots]

    def extra_repr(self) -> str:
        return f"policy={self.policy.name!r}, channels={self.channels}, image_size={self.image_size}"

    def forward(self, x: Tensor) -> Tensor:
        """x: float (B, C, H, W) in [0, 1]; returns the augmented batch, same shape and dtype (x is not changed)."""
        if x.ndim != 4 or x.shape[1] != self.channels or not x.is_floating_point():
            raise ValueError(f"expected a float batch (B, {self.channels}, H, W), got {tuple(x.shape)} {x.dtype}")
        if not self.policy.slots or x.shape[0] == 0:
            return x
        draws = sample_draws(self.policy, x.shape[0], x.device)
        if x.dtype != torch.float32:  # geometry and blends are computed in float32
            return self.apply_draws(x.float(), draws).to(x.dtype)
        return self.apply_draws(x, draws)

    @torch.no_grad()
    def apply_draws(self, x: Tensor, draws: Draws) -> Tensor:
        """Apply given draws (one row per image) to a float32 batch; forward() is apply_draws(x, sample_draws(...)).
        x is not modified. (Not named `apply`: that is nn.Module's, which walks submodules.)"""
        height, width = x.shape[-2:]
        owned = False  # whether x is a tensor made here, which colour ops may then change in place
        for group in self._groups:
            warped = self._warp_group(x, draws, group, height, width)
            owned, x = owned or warped is not x, warped
            if len(group.slots) == 1:
                x, owned = self._colour_slot(x, owned, draws, group.slots[0])
        return x

    def _warp_group(self, x: Tensor, draws: Draws, group: _Group, height: int, width: int) -> Tensor:
        """One resampling of the batch through each image's composition of the group's maps. Where no slot of the
        group always moves every image, the images that drew no geometric op keep their pixels (the warp through
        the identity map reproduces them only up to rounding)."""
        affine, moved = None, None
        for s in group.slots:
            slot_affine, slot_moved = self._slot_affine(draws, s, height, width)
            if slot_affine is None:
                continue
            affine = slot_affine if affine is None else affine.then(slot_affine)
            if not group.always_moves:
                moved = slot_moved if moved is None else moved | slot_moved
        if affine is None:
            return x
        warped = _warp(x, affine)
        return warped if group.always_moves else _select(moved, warped, x)

    def _slot_affine(self, draws: Draws, s: int, height: int, width: int) -> tuple[Affine | None, Tensor | None]:
        """Per-image maps of slot s (identity where an image drew no geometric op), and which images it moves
        (None: all). Each geometric op's map is computed for every image and selected by the image's choice."""
        ops, geometric = self.policy.slots[s].ops, self._geometric[s]
        if not geometric:
            return None, None
        choice, u = draws.choice[:, s], draws.u[:, s]
        if len(ops) == 1 and ops[0].p >= 1.0:
            return KINDS[ops[0].kind].matrix(ops[0], u, height, width), None
        affine, moved = Affine(), None
        for j in geometric:
            hit = choice == j
            affine = KINDS[ops[j].kind].matrix(ops[j], u, height, width).where(hit, affine)
            moved = hit if moved is None else moved | hit
        return affine, moved

    def _colour_slot(self, x: Tensor, owned: bool, draws: Draws, s: int) -> tuple[Tensor, bool]:
        """The colour ops of slot s, each on the whole batch: an image that did not draw an op gets the op's
        neutral value, or keeps its pixels through torch.where where the op has none."""
        ops, colour = self.policy.slots[s].ops, self._colour[s]
        if not colour:
            return x, owned
        choice, u = draws.choice[:, s], draws.u[:, s]
        every = len(ops) == 1 and ops[0].p >= 1.0  # every image applies the slot's one op
        for j in colour:
            kind = KINDS[ops[j].kind]
            v = kind.value(ops[j], u)
            if kind.neutral is None:  # a new tensor, into which the images that did not draw the op keep x
                y = kind.batched(x, v)
                x = y if every else _select(choice == j, y, x)
            else:  # in place, on a copy unless x is ours
                x = kind.batched(x if owned else x.clone(), v if every else torch.where(choice == j, v, kind.neutral))
            owned = True
        return x, owned


def _select(mask: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """y for the images where mask holds, x elsewhere, written into y (a new tensor of the caller's): on CPU a
    new image-sized result would be memory mapped and faulted in afresh every batch."""
    return torch.where(mask.view(-1, 1, 1, 1), y, x, out=y)


def _warp(x: Tensor, affine: Affine) -> Tensor:
    """Resample x (B, C, H, W) through per-image forward maps: bilinear, zero fill, one grid_sample per batch.

    grid_sample reads the input at normalised coordinates in which -1 and 1 are the first and last pixel centres
    (align_corners=True, the points kornia's warp_affine with align_corners=True samples). The grid is the
    inverse map (each output pixel's source), which about the image centre, as the maps are kept, only needs
    rescaling by half the distance between the outer pixel centres, (size - 1) / 2 per axis.
    """
    n, channels, height, width = x.shape
    sx, sy = (width - 1) / 2, (height - 1) / 2
    a, b, tx, c, d, ty = affine.inverse()
    theta = Affine(a, _mul(b, sy / sx), _mul(tx, 1 / sx), _mul(c, sx / sy), d, _mul(ty, 1 / sy))
    grid = nn.functional.affine_grid(theta.rows(n, x.device).to(x.dtype), [n, channels, height, width],
                                     align_corners=True)
    return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
