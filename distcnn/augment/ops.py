"""The op kinds, each with its parameters and both of its implementations side by side.

`distcnn.augment.sampling.sample_draws` draws for every image and slot the op it applies and a few uniform
numbers; the op kinds (`Kind`, registered by name in `KINDS`) turn those numbers into parameters (an angle, a
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
from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

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

_GREY = (0.2989, 0.587, 0.114)  # torchvision's luma weights


def _factor(v: Tensor, x: Tensor) -> Tensor:
    return v.to(x.dtype).view(-1, 1, 1, 1)


def _brightness_(x: Tensor, v: Tensor) -> Tensor:
    return x.mul_(_factor(v, x)).clamp_(0.0, 1.0)


def _contrast_(x: Tensor, v: Tensor) -> Tensor:
    """Blend with the mean grey level of each image (the mean of the luma, taken per channel first)."""
    f = _factor(v, x)
    if x.shape[1] == 3:  # the weights as numbers: a tensor made of them would be a blocking copy to the device
        m = x.mean(dim=(-2, -1))
        mean = (m[:, 0] * _GREY[0]).add_(m[:, 1], alpha=_GREY[1]).add_(m[:, 2], alpha=_GREY[2]).view(-1, 1, 1, 1)
    else:
        mean = x.mean(dim=(-3, -2, -1), keepdim=True)
    return x.mul_(f).add_(mean * (1 - f)).clamp_(0.0, 1.0)


def _saturation_(x: Tensor, v: Tensor) -> Tensor:
    """Blend with the luma image (3 channels only)."""
    f = _factor(v, x)
    grey = x[:, 0:1] * _GREY[0]
    grey.add_(x[:, 1:2], alpha=_GREY[1]).add_(x[:, 2:3], alpha=_GREY[2]).mul_(1 - f)
    return x.mul_(f).add_(grey).clamp_(0.0, 1.0)


def _sharpness_(x: Tensor, v: Tensor) -> Tensor:
    """Blend the interior with a 3x3 smoothing (1s around a 5, over 13), borders kept: PIL's and torchvision's
    rule. The smoothing is a 3x3 box sum (two passes of shifted views) plus 4x the centre: a convolution
    (kornia's grouped one, or a plain one) costs about 0.5 ms per call on CPU even for a handful of images.
    The blend is written x + (1 - f) (smooth - x), which is x exactly at f = 1 (f x + (1 - f) smooth is not)."""
    rows = (x[..., :, :-2] + x[..., :, 1:-1]).add_(x[..., :, 2:])
    smooth = (rows[..., :-2, :] + rows[..., 1:-1, :]).add_(rows[..., 2:, :])
    inner = x[..., 1:-1, 1:-1]
    smooth.add_(inner, alpha=4.0).div_(13.0)
    inner.add_(smooth.sub_(inner).mul_(1 - _factor(v, x)))
    return x.clamp_(0.0, 1.0)


class Enhance(Kind):
    """Blend-style colour ops: factor = 1 + strength; 1 leaves the image as is."""

    limit = 1.0  # a signed strength beyond 1 would give a negative factor
    neutral = 1.0

    def __init__(self, batched: Callable[[Tensor, Tensor], Tensor], per_sample: Callable[[Tensor, float], Tensor],
                 rgb_only: bool = False):
        self._batched, self._per_sample, self.rgb_only = batched, per_sample, rgb_only

    def value(self, op, u):
        return 1.0 + strength(op, u)

    def batched(self, x, v):
        return self._batched(x, v)

    def per_sample(self, x, v):
        return self._per_sample(x, v)


class Posterize(Kind):
    """Keep 8 - round(strength) bits, by torchvision's float rule floor(x * 2^b) / 2^b (kornia's posterize
    works on 255-scaled integers, a slightly different rule, so the batched op is written out here)."""

    limit = 7.0  # keep at least one bit

    def value(self, op, u):
        return 8.0 - strength(op, u).round()

    def batched(self, x, v):
        levels = torch.exp2(_factor(v, x))
        return x.mul(levels).floor_().clamp_(max=levels - 1).div_(levels)

    def per_sample(self, x, v):
        return TF.posterize(x, int(v))


class Solarize(Kind):
    """Invert pixels at or above the threshold 1 - strength (an infinite threshold inverts none).

    The batched op is |x - m| in place, with m = sign(sign(x - t) + 1): 1 where x >= t (x - t >= 0 exactly
    then), 0 elsewhere; |x - 1| is 1 - x and |x - 0| is x, bit for bit, for x in [0, 1]. On CPU a comparison to
    a bool tensor and a select on it are not vectorised: torch.where(x >= t, 1 - x, x) takes 1.2 ms on
    128x3x32x32 (2 threads), this 0.2."""

    limit = 1.0
    neutral = math.inf

    def value(self, op, u):
        return 1.0 - strength(op, u)

    def batched(self, x, v):
        return x.sub_((x - _factor(v, x)).sign_().add_(1.0).sign_()).abs_()

    def per_sample(self, x, v):
        return TF.solarize(x, v)


class AutoContrast(Kind):
    """Stretch each channel to [0, 1]; a flat channel is left as is. The batched value says whether to stretch
    (1) or not (0, neutral: (x - 0) / 1 is x exactly)."""

    neutral = 0.0

    def value(self, op, u):
        return torch.ones(u.shape[0], device=u.device)

    def batched(self, x, v):
        low = x.amin(dim=(-2, -1), keepdim=True)
        span = x.amax(dim=(-2, -1), keepdim=True) - low
        keep = (span == 0) | (v.view(-1, 1, 1, 1) == 0)
        return x.sub_(low.masked_fill_(keep, 0.0)).div_(span.masked_fill_(keep, 1.0)).clamp_(0.0, 1.0)

    def per_sample(self, x, v):
        return TF.autocontrast(x)


class Equalize(Kind):
    """Histogram equalisation per channel by PIL's rule, as torchvision's tensor kernel has it (the per-sample
    backend calls that kernel; the tests check that both give the same pixels). A pixel's level is
    trunc(255.999 x); step is the number of pixels not on the highest level present, // 255; each level maps to
    (pixels on lower levels + step // 2) // step, at most 255, and a channel with step 0 keeps its levels.

    Written out for the batch, in float arithmetic (exact below 2^24 pixels per channel): torchvision's kernel
    takes a batch too and reads nothing back to the host, but converts the batch to uint8, to int64 and back and
    counts by adding an int32 one per pixel: 2.5 ms against 1.3 on 128x3x32x32 (2 threads)."""

    def batched(self, x, v):
        n, c, h, w = x.shape
        level = x.mul(255.999).long().view(n * c, h * w)
        hist = x.new_zeros(n * c, 256).scatter_add_(1, level, x.new_ones(1).expand(n * c, h * w))
        upto = hist.cumsum(1)  # pixels on this level or below
        highest = upto.lt(h * w).sum(1, keepdim=True)  # the levels below the highest present
        step = hist.gather(1, highest).neg_().add_(h * w).div_(255).floor_()
        lut = upto.sub_(hist).add_(step.div(2).floor_()).div_(step.clamp(min=1)).floor_().clamp_(max=255)
        lut = torch.where(step > 0, lut, torch.arange(256.0, device=x.device)).mul_(1 / 255)
        return lut.gather(1, level).view(n, c, h, w)

    def per_sample(self, x, v):
        return TF.equalize(x)


KINDS: dict[str, Kind] = {
    "identity": Identity(),
    "rotate": Rotate(),
    "shear_x": Shear("x"),
    "shear_y": Shear("y"),
    "translate_x": Translate("x"),
    "translate_y": Translate("y"),
    "pad_crop": PadCrop(),
    "hflip": HFlip(),
    "resized_crop": ResizedCrop(),
    "brightness": Enhance(_brightness_, TF.adjust_brightness),
    "contrast": Enhance(_contrast_, TF.adjust_contrast),
    "saturation": Enhance(_saturation_, TF.adjust_saturation, rgb_only=True),
    "sharpness": Enhance(_sharpness_, TF.adjust_sharpness),
    "posterize": Posterize(),
    "solarize": Solarize(),
    "autocontrast": AutoContrast(),
    "equalize": Equalize(),
}
