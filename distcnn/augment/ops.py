"""The op kinds' base (`Kind`, `Affine`, `strength`) and the geometric kinds; the colour kinds are
distcnn.augment.colour's, and distcnn.augment.kinds names them all. Each kind has its parameters and both of its
implementations side by side.

`distcnn.augment.sampling.sample_draws` draws for every image and slot the op it applies and a few uniform
numbers; the op kinds (`Kind`, registered by name in `kinds.KINDS`) turn those numbers into parameters (an angle, a
crop box, a factor) with code shared by both backends, which only *apply* them: a geometric kind gives a forward
map (`Affine`) that the backends compose and resample once, a colour kind gives one value per image that its
`batched` method applies to a batch (BatchedAugment) and its `per_sample` method to one image (PerSampleAugment,
through torchvision v2). Keeping both implementations of a kind next to each other is what keeps the two
backends the same distribution.

Decisions (each also stated where it is implemented):
- Resized crops are continuous boxes; a box that would leave the image is clamped to it (torchvision
  rejects and redraws up to ten times). Area uniform in the range, aspect ratio log-uniform.
- Colour ops follow torchvision's float definitions throughout. Brightness, contrast, saturation and sharpness
  are kornia's blends done in place (0.17 vs 3.7 ms for the three of `paper` on 128x3x32x32: kornia allocates
  image-sized temporaries, which the allocator returns and re-faults every batch). Posterize and equalize are
  torchvision's rules written out for the batch: kornia's posterize works on 255-scaled integers, its equalize
  bins by trunc(255 x) and loops over the images in Python, reading values back to the host.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor

from distcnn.augment.spec import Op

_UNIFORMS = 7  # per image and slot: op choice, apply?, a random sign (+-1), then up to four uniform numbers


def strength(op: Op, u: Tensor) -> Tensor:
    """(n,) strength of `op` from its draws u (n, _UNIFORMS): uniform in [low, high], random sign if signed."""
    if op.low == op.high:
        return u[:, 2] * op.high if op.signed else torch.full_like(u[:, 3], op.high)
    value = u[:, 3] * (op.high - op.low)
    value = value + op.low if op.low else value
    return value * u[:, 2] if op.signed else value


Entry = float | Tensor  # a matrix entry: one number for all images, or one per image (n,)


def _mul(x: Entry, y: Entry) -> Entry:
    if isinstance(x, float) and x in (0.0, 1.0):
        return 0.0 if x == 0.0 else y
    if isinstance(y, float) and y in (0.0, 1.0):
        return 0.0 if y == 0.0 else x
    return x * y


def _add(x: Entry, y: Entry) -> Entry:
    if isinstance(x, float) and x == 0.0:
        return y
    if isinstance(y, float) and y == 0.0:
        return x
    return x + y


class Affine(NamedTuple):
    """A forward map [[a, b, tx], [c, d, ty]] in pixels about the image centre (x right, y down), per image.

    Entries stay plain numbers where every image shares them (most are 0 or 1), so composing the five geometric
    ops of `paper` costs a few dozen small tensor ops instead of 3x3 matrix products, and the per-sample backend
    runs the same arithmetic on one image."""

    a: Entry = 1.0
    b: Entry = 0.0
    tx: Entry = 0.0
    c: Entry = 0.0
    d: Entry = 1.0
    ty: Entry = 0.0

    def then(self, o: Affine) -> Affine:
        """This map followed by o."""
        return Affine(
            _add(_mul(o.a, self.a), _mul(o.b, self.c)),
            _add(_mul(o.a, self.b), _mul(o.b, self.d)),
            _add(_add(_mul(o.a, self.tx), _mul(o.b, self.ty)), o.tx),
            _add(_mul(o.c, self.a), _mul(o.d, self.c)),
            _add(_mul(o.c, self.b), _mul(o.d, self.d)),
            _add(_add(_mul(o.c, self.tx), _mul(o.d, self.ty)), o.ty),
        )

    def inverse(self) -> Affine:
        r = 1.0 / _add(_mul(self.a, self.d), -_mul(self.b, self.c))  # 1 / determinant
        a, b, c, d = _mul(self.d, r), _mul(-self.b, r), _mul(-self.c, r), _mul(self.a, r)
        return Affine(a, b, -_add(_mul(a, self.tx), _mul(b, self.ty)),
                      c, d, -_add(_mul(c, self.tx), _mul(d, self.ty)))

    def where(self, mask: Tensor, other: Affine | None = None) -> Affine:
        """This map for the images where mask holds, `other` (default: the identity) elsewhere."""
        return Affine(*(e if isinstance(e, float) and isinstance(o, float) and e == o else torch.where(mask, e, o)
                        for e, o in zip(self, other or Affine())))

    def rows(self, n: int, device: torch.device) -> Tensor:
        """(n, 2, 3) float32."""
        return torch.stack([e.float() if isinstance(e, Tensor) else torch.full((n,), e, device=device)
                            for e in self], dim=1).view(n, 2, 3)


class Kind:
    """A kind of op: how its uniform numbers become parameters, and how both backends apply them.

    Geometric kinds give a forward map (`matrix`, an Affine in pixels about the image centre), which the backends
    compose and resample once. Colour kinds give one value per image (`value`) and apply it to a batch
    (`batched`: tensor ops) or to one image (`per_sample`: torchvision v2). A colour kind with a `neutral` value,
    one that leaves every image exactly as it is, is applied by the batched backend to the whole batch with that
    value on the images that did not draw it; the others are applied to the whole batch and selected per image."""

    geometric = False
    rgb_only = False
    noop = False
    limit: float | None = None  # the largest strength that is still defined (None: any)
    neutral: float | None = None  # colour kinds: the value that leaves an image bit for bit as it is, if any

    def scaled(self, op: Op, s: float) -> Op:
        """`op` at augmentation strength s: its strength range times s, clamped to [0, limit], and its
        probability times s, at most 1. Ops without a strength (flip, autocontrast...) scale by probability."""
        def clamp(value: float) -> float:
            value *= s
            return min(value, self.limit) if self.limit is not None else value

        return replace(op, low=clamp(op.low), high=clamp(op.high), p=min(1.0, op.p * s))

    def matrix(self, op: Op, u: Tensor, height: int, width: int) -> Affine:
        raise NotImplementedError

    def value(self, op: Op, u: Tensor) -> Tensor:
        return torch.zeros(u.shape[0], device=u.device)

    def batched(self, x: Tensor, v: Tensor) -> Tensor:
        """Apply to a batch with one value per image. A kind with a `neutral` value may work in place on x (which
        the caller then owns); the others leave x as it is and return a new tensor, into which the caller selects
        x for the images that did not draw the op."""
        raise NotImplementedError

    def per_sample(self, x: Tensor, v: float) -> Tensor:
        raise NotImplementedError


class Identity(Kind):
    """Leaves the image as is (one of TrivialAugment's and RandAugment's choices)."""

    noop = True


class Rotate(Kind):
    """Strength in degrees, counter-clockwise on screen (torchvision's sign), about the image centre."""

    geometric = True
    limit = 180.0

    def matrix(self, op, u, height, width):
        t = torch.deg2rad(strength(op, u))
        cos, sin = t.cos(), t.sin()
        return Affine(cos, sin, 0.0, -sin, cos, 0.0)


class Shear(Kind):
    """Strength is the shear factor: x += s * y (axis x) or y += s * x (axis y), about the image centre."""

    geometric = True

    def __init__(self, axis: str):
        self.axis = axis

    def matrix(self, op, u, height, width):
        s = strength(op, u)
        return Affine(b=s) if self.axis == "x" else Affine(c=s)


class Translate(Kind):
    """Strength is a fraction of the image's width (axis x) or height (axis y)."""

    geometric = True
    limit = 1.0  # the whole image: beyond, nothing is left to move

    def __init__(self, axis: str):
        self.axis = axis

    def matrix(self, op, u, height, width):
        s = strength(op, u)
        return Affine(tx=s * width) if self.axis == "x" else Affine(ty=s * height)


class PadCrop(Kind):
    """Pad by floor(high * size) pixels and crop back at a random integer place: an integer shift per axis."""

    geometric = True
    limit = 1.0

    def matrix(self, op, u, height, width):
        px, py = int(op.high * width), int(op.high * height)
        dx = (u[:, 3] * (2 * px + 1)).floor().clamp(max=2 * px) - px
        dy = (u[:, 4] * (2 * py + 1)).floor().clamp(max=2 * py) - py
        return Affine(tx=dx, ty=dy)


class HFlip(Kind):
    """Mirror left-right (with the op's probability p)."""

    geometric = True

    def matrix(self, op, u, height, width):
        return Affine(a=-1.0)


class ResizedCrop(Kind):
    """A box of area [low, high] of the image and log-uniform aspect ratio in `ratio`, stretched to full size."""

    geometric = True
    min_area = 0.01

    def scaled(self, op, s):
        """The crop's strength is what it cuts away, 1 - area, and the log of the aspect ratio: both times s
        (area at least min_area); the probability as every op's."""
        def area(value: float) -> float:
            return max(self.min_area, 1.0 - s * (1.0 - value))

        return replace(op, low=area(op.low), high=area(op.high), ratio=(op.ratio[0] ** s, op.ratio[1] ** s),
                       p=min(1.0, op.p * s))

    def matrix(self, op, u, height, width):
        area = op.low + (op.high - op.low) * u[:, 3]
        lo, hi = math.log(op.ratio[0]), math.log(op.ratio[1])
        ratio = torch.exp(lo + (hi - lo) * u[:, 4])
        bw = torch.sqrt(area * ratio).clamp(max=1.0)  # box size as fractions of the image
        bh = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (u[:, 5] * (1 - bw) + bw / 2 - 0.5) * width  # box centre relative to the image centre, pixels
        cy = (u[:, 6] * (1 - bh) + bh / 2 - 0.5) * height
        return Affine(a=1 / bw, tx=-cx / bw, d=1 / bh, ty=-cy / bh)


# Colour ops follow torchvision's float definitions. The batched versions of the blends work in place on a
# tensor the caller owns: kornia.enhance's adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction
# and adjust_saturation_with_gray_subtraction compute the same blends but allocate three or four image-sized
# temporaries each, and on CPU the allocator then returns and re-faults that memory every batch (the three on
# 128x3x32x32, median of many calls: 3.7 ms with kornia, 0.17 ms in place with 2 threads; 4.3 vs 0.29 with 1).
# At factor 1 each blend leaves an image bit for bit as it is (x * 1 + 0 * anything finite), which lets the
# batched backend run a blend on a whole batch of which only some images drew it.


GEOMETRIC_KINDS: dict[str, Kind] = {
    "identity": Identity(),
    "rotate": Rotate(),
    "shear_x": Shear("x"),
    "shear_y": Shear("y"),
    "translate_x": Translate("x"),
    "translate_y": Translate("y"),
    "pad_crop": PadCrop(),
    "hflip": HFlip(),
    "resized_crop": ResizedCrop(),
}
