"""Augmentation policies and their two backends, driven by one policy definition.

A **policy** is data: a sequence of slots, each a tuple of ops (`Op`: a kind of transform and the range its
strength is drawn from). In every slot each image picks one of the slot's ops uniformly and applies it with that
op's probability. "Each op with probability p" (`paper`, `flip-crop`) is a run of one-op slots; "choose k ops of
a space" (`trivialaugment`, `randaugment`) is k slots holding the whole space.

One sampler, `sample_draws`, draws for every image and slot the op it applies and a few uniform numbers; the op
kinds turn those numbers into parameters (an angle, a crop box, a factor) with code shared by both backends,
which only *apply* them:

- **batched** (`BatchedAugment`, the default): a whole float batch on the training device, never waiting for
  it: nothing is read back to the host, and the ops dispatched depend only on the policy and the batch's shape,
  not on what the images drew (so a GPU is not stalled and torch.compile traces one graph). Consecutive
  geometric slots (rotation, shear, translation, resized crop, flip) are composed into one affine map per
  image and applied by one bilinear warp per batch. Every op of a slot is computed for every image, and each
  image keeps what its own draw gives: a geometric op's map (a few numbers per image) is selected per image
  before the warp; a colour op that some value leaves exactly as it is (the blends at factor 1, solarize at a
  threshold no pixel reaches, autocontrast told not to stretch) gets that value on the images that did not
  draw it, and the others (posterize, equalize) are selected per image with torch.where. An image that drew
  nothing keeps its pixels bit for bit.
- **per-sample** (`PerSampleAugment`): one uint8 image at a time in a DataLoader worker, through
  `torchvision.transforms.v2.functional`. The composed map goes through `v2.functional.perspective` (an
  affine map is a perspective with a zero last row), so both backends resample each image once, bilinearly,
  with zero fill, at the same coordinates; colour ops are torchvision's functionals with the drawn factors.
  `augment_many` takes a worker's whole batch of images: one draw and one parameter computation for all of
  them, then torchvision image by image.

The two are therefore the same distribution by construction, and the same draws give the same image up to float
rounding and the final uint8 quantisation (tests/test_augment.py checks this op by op and policy by policy).

Why not kornia's own auto-augment modules: in kornia 0.9.0 `kornia.augmentation.auto.TrivialAugment` and
`RandAugment` pick their op(s) in `get_forward_sequence` once per forward call, so every image of a batch gets
the same op. distcnn draws the op per image.

Decisions (each also stated where it is implemented):
- `paper` shear 0.2 is a shear *angle* of up to 0.2 rad (11.5 degrees) in x, as Keras' `shear_range`; it is
  applied as the factor tan(phi), drawn uniformly in +-tan(0.2) (over that range tan is linear within 1.4 %).
- `paper` colour jitter applies brightness, contrast, saturation in this fixed order (torchvision's
  ColorJitter permutes them per call), factors uniform in [0.8, 1.2]; saturation is dropped on 1 channel.
- Resized crops are continuous boxes; a box that would leave the image is clamped to it (torchvision
  rejects and redraws up to ten times). Area uniform in the range, aspect ratio log-uniform.
- `flip-crop` pads with zeros (the warp's fill): a random integer shift of up to image_size // 8 pixels per
  axis is exactly pad-with-zeros then random crop.
- `trivialaugment`: TrivialAugmentWide's ops and ranges, magnitude drawn uniformly (continuous, where
  torchvision draws one of 31 bins), random sign for signed ops. Its 32-pixel translation is stated for
  32-pixel CIFAR images and is scaled here to the image size (up to 100 % of it). Shears (here and in
  `randaugment`) pivot on the image centre; torchvision and PIL pivot on the top-left corner, which adds a
  shift. Posterize keeps 8 - round(s) bits for s uniform in [0, 6]; solarize inverts from 1 - s, s in [0, 1].
- `randaugment`: N=2 ops per image drawn with replacement from the same op names, each at the fixed magnitude
  M=9 of 30 of RandAugment's own ranges (torchvision.transforms.RandAugment's: shear 0.3, translation
  150/331 of the image, rotation 30 degrees, enhance factors 1 +- 0.9, posterize to 4 bits, solarize), with a
  random sign for signed ops, as in the RandAugment paper: shear factor +-0.09, translation +-13.6 % of the
  image, rotation +-9 degrees, factors 1 +- 0.27, posterize to 7 bits, solarize above 0.7.
- `--aug-strength s` (Policy.scaled) multiplies every op's strength range and its probability by s, before
  either backend sees the policy, so both honour it: probabilities are clipped to 1 and strengths to what the
  op defines (rotation 180 degrees, translation and pad-crop the whole image, enhance factors 0..2, posterize
  down to 1 bit, solarize from 0); a resized crop scales what it cuts away (1 - area, area at least 1 %) and
  the log of its aspect ratio. s = 1 is the policy itself (bit-identical), s = 0 is no augmentation.
  MixUp and CutMix keep their own alphas.
- The batched backend is plain torch, chosen for what it costs on CPU (batch 128, 2 threads; numbers at each
  function) and for never reading a value back to the host. The warp is torch's affine_grid and grid_sample
  (bilinear, zero fill, align_corners=True: the points kornia's warp_affine with align_corners=True samples, in
  fewer ops), one call per batch for all composed geometric ops. Brightness, contrast, saturation and sharpness
  are kornia's blends done in place (0.17 vs 3.7 ms for the three of `paper` on 128x3x32x32: kornia allocates
  image-sized temporaries, which the allocator returns and re-faults every batch). Posterize and equalize are
  torchvision's rules written out for the batch: kornia's posterize works on 255-scaled integers, its equalize
  bins by trunc(255 x) and loops over the images in Python, reading values back to the host. Colour ops follow
  torchvision's float definitions throughout.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from distcnn.errors import UsageError, unknown

BACKENDS = ("batched", "per-sample")
_UNIFORMS = 7  # per image and slot: op choice, apply?, a random sign (+-1), then up to four uniform numbers


# ---------------------------------------------------------------- the policy spec


@dataclass(frozen=True)
class Op:
    """One op of a policy: its kind (a key of KINDS) and the range its strength is drawn from.

    The strength is uniform in [low, high] (low == high: fixed), negated with probability 1/2 when `signed`.
    What it means is the kind's business (degrees, a shear factor, a fraction of the image, factor - 1...).
    """

    kind: str
    low: float = 0.0
    high: float = 0.0
    signed: bool = False
    p: float = 1.0
    ratio: tuple[float, float] = (1.0, 1.0)  # resized_crop only: aspect-ratio range, drawn log-uniformly


@dataclass(frozen=True)
class Slot:
    """One step of a policy: each image picks one of `ops` uniformly and applies it with that op's `p`."""

    ops: tuple[Op, ...]


@dataclass(frozen=True)
class Policy:
    """A named augmentation recipe: its slots, applied in order."""

    name: str
    slots: tuple[Slot, ...]
    doc: str = field(default="", compare=False)

    def scaled(self, strength: float) -> Policy:
        """This policy at `--aug-strength` s: every op's magnitudes and probability times s (see Kind.scaled).
        s = 1 is this very policy (bit-identical runs); s = 0 has no slots (identity, as `none`)."""
        if strength < 0 or not math.isfinite(strength):
            raise UsageError(f"augmentation strength must be a number >= 0, got {strength}")
        if strength == 1:
            return self
        if strength == 0:
            return replace(self, slots=())
        return replace(self, slots=tuple(Slot(tuple(KINDS[op.kind].scaled(op, strength) for op in s.ops))
                                         for s in self.slots))

    def for_channels(self, channels: int) -> Policy:
        """This policy without the ops that need colour (saturation) when images have one channel."""
        if channels == 3:
            return self
        slots = tuple(Slot(tuple(op for op in s.ops if not KINDS[op.kind].rgb_only)) for s in self.slots)
        return replace(self, slots=tuple(s for s in slots if s.ops))


def each(*ops: Op) -> tuple[Slot, ...]:
    """Apply every op in turn, each with its own probability."""
    return tuple(Slot((op,)) for op in ops)


def choose(k: int, ops: tuple[Op, ...]) -> tuple[Slot, ...]:
    """Per image, k ops drawn uniformly with replacement from `ops`, applied in the order drawn."""
    return (Slot(ops),) * k


_REGISTRY: dict[str, Policy] = {}


def register_policy(fn: Callable[[], tuple[Slot, ...]]) -> Callable[[], tuple[Slot, ...]]:
    """Register a policy under its function's name (underscores become dashes); its docstring describes it."""
    name = fn.__name__.replace("_", "-")
    _REGISTRY[name] = Policy(name, tuple(fn()), (fn.__doc__ or "").strip())
    return fn


# ---------------------------------------------------------------- op kinds: parameters and both implementations


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


# ---------------------------------------------------------------- the registry


@register_policy
def none() -> tuple[Slot, ...]:
    """No augmentation; normalisation is done by the training loop."""
    return ()


@register_policy
def flip_crop() -> tuple[Slot, ...]:
    """The classic CIFAR recipe: zero-pad by image_size // 8, random crop back, horizontal flip p=0.5."""
    return each(Op("pad_crop", high=1 / 8), Op("hflip", p=0.5))


@register_policy
def paper() -> tuple[Slot, ...]:
    """The cost study's recipe (DESIGN.md): rotation +-5 deg, shear angle up to 0.2 rad in x, translation
    +-5 %, resized crop to 80-100 % of the area (aspect 3/4..4/3), horizontal flip p=0.5, then brightness,
    contrast, saturation factors in [0.8, 1.2] (saturation only on 3 channels)."""
    return each(
        Op("rotate", high=5.0, signed=True),
        Op("shear_x", high=math.tan(0.2), signed=True),
        Op("translate_x", high=0.05, signed=True),
        Op("translate_y", high=0.05, signed=True),
        Op("resized_crop", low=0.8, high=1.0, ratio=(3 / 4, 4 / 3)),
        Op("hflip", p=0.5),
        Op("brightness", high=0.2, signed=True),
        Op("contrast", high=0.2, signed=True),
        Op("saturation", high=0.2, signed=True),
    )


def _op_space(shear: float, translate: float, rotate: float, enhance: float, posterize: float,
              solarize: float, fixed: bool) -> tuple[Op, ...]:
    """The TrivialAugment/RandAugment op names with the given maximum strengths (fixed: always the maximum)."""

    def op(kind: str, high: float = 0.0, signed: bool = False) -> Op:
        return Op(kind, high if fixed else 0.0, high, signed)

    return (
        op("identity"),
        op("shear_x", shear, True), op("shear_y", shear, True),
        op("translate_x", translate, True), op("translate_y", translate, True),
        op("rotate", rotate, True),
        op("brightness", enhance, True), op("saturation", enhance, True),
        op("contrast", enhance, True), op("sharpness", enhance, True),
        op("posterize", posterize),  # bits removed: keeps 8 - round(strength)
        op("solarize", solarize),  # threshold 1 - strength
        op("autocontrast"), op("equalize"),
    )


@register_policy
def trivialaugment() -> tuple[Slot, ...]:
    """TrivialAugmentWide: one op per image, strength uniform in its range, random sign for signed ops."""
    return choose(1, _op_space(shear=0.99, translate=1.0, rotate=135.0, enhance=0.99, posterize=6.0,
                               solarize=1.0, fixed=False))


RANDAUGMENT_N, RANDAUGMENT_M = 2, 9


@register_policy
def randaugment() -> tuple[Slot, ...]:
    """RandAugment N=2, M=9 of 30: two ops per image at the fixed strength 9/30 of RandAugment's ranges,
    random sign for signed ops."""
    f = RANDAUGMENT_M / 30
    return choose(RANDAUGMENT_N, _op_space(shear=0.3 * f, translate=150 / 331 * f, rotate=30.0 * f,
                                           enhance=0.9 * f, posterize=4.0 * f, solarize=f, fixed=True))


POLICIES = tuple(_REGISTRY)


def get_policy(name: str) -> Policy:
    """The registered policy called `name`; an unknown name is a UsageError naming the nearest policy."""
    if name not in _REGISTRY:
        raise unknown("policy", name, POLICIES)
    return _REGISTRY[name]


# ---------------------------------------------------------------- the shared sampler


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


# ---------------------------------------------------------------- batched backend


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


# ---------------------------------------------------------------- per-sample backend


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


# ---------------------------------------------------------------- factory and batch-level mixing


def build_augment(policy_name: str, backend: str, channels: int, image_size: int, strength: float = 1.0
                  ) -> BatchedAugment | PerSampleAugment | None:
    """The augmentation of a run: None for `none` (or strength 0), else the policy at `strength` (see
    Policy.scaled) on the chosen backend."""
    policy = get_policy(policy_name).scaled(strength)
    if backend not in BACKENDS:
        raise unknown("augmentation backend", backend, BACKENDS)
    if not policy.slots:
        return None
    cls = BatchedAugment if backend == "batched" else PerSampleAugment
    return cls(policy, channels, image_size)


class BatchMix:
    """MixUp and/or CutMix on a device batch: (x (B, C, H, W), y int64 (B,)) -> (x, soft targets (B, K)).

    torchvision v2's MixUp/CutMix (one lambda per batch, images paired with the batch rolled by one); with both
    alphas > 0 each batch uses one of them, chosen with equal odds. Both alphas 0 means no mixing: a BatchMix
    that only one-hot encodes would hide a configuration mistake, so it is refused (build_batch_mix gives None).
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise UsageError(f"mixup and cutmix alphas must be >= 0, got mixup={mixup_alpha}, cutmix={cutmix_alpha}")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise UsageError("BatchMix needs mixup or cutmix alpha > 0 (both are 0: nothing to mix)")
        if num_classes < 2:
            raise UsageError(f"mixing labels needs at least 2 classes, got {num_classes}")
        self.mixup_alpha, self.cutmix_alpha, self.num_classes = mixup_alpha, cutmix_alpha, num_classes
        mixes = []
        if mixup_alpha > 0:
            mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self._mix = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

    def __repr__(self) -> str:
        return f"BatchMix(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, " \
               f"num_classes={self.num_classes})"

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._mix(x, y)


def build_batch_mix(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> BatchMix | None:
    """The batch mixing of a run, or None when both alphas are 0."""
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return None
    return BatchMix(mixup_alpha, cutmix_alpha, num_classes)
