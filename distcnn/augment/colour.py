"""The colour op kinds: one value per image (a blend factor, a number of bits, a threshold), applied to a batch
by `batched` and to one image by `per_sample` (torchvision v2), side by side (distcnn.augment.ops: the kinds'
base and the geometric ones)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from distcnn.augment.ops import Kind, strength


_GREY = (0.2989, 0.587, 0.114)  # torchvision's luma weights


def tv(name: str) -> Callable:
    """torchvision v2's functional op `name`, which the per-sample backend applies. Imported on first use: a rank
    that only augments batches never imports torchvision (with it torch._dynamo: 1.5 s of CPU per process)."""
    from torchvision.transforms.v2 import functional

    return getattr(functional, name)


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

    def __init__(self, batched: Callable[[Tensor, Tensor], Tensor], per_sample: str, rgb_only: bool = False):
        self._batched, self._per_sample, self.rgb_only = batched, per_sample, rgb_only  # per_sample: tv's name

    def value(self, op, u):
        return 1.0 + strength(op, u)

    def batched(self, x, v):
        return self._batched(x, v)

    def per_sample(self, x, v):
        return tv(self._per_sample)(x, v)


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
        return tv("posterize")(x, int(v))


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
        return tv("solarize")(x, v)


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
        return tv("autocontrast")(x)


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
        return tv("equalize")(x)


COLOUR_KINDS: dict[str, Kind] = {
    "brightness": Enhance(_brightness_, "adjust_brightness"),
    "contrast": Enhance(_contrast_, "adjust_contrast"),
    "saturation": Enhance(_saturation_, "adjust_saturation", rgb_only=True),
    "sharpness": Enhance(_sharpness_, "adjust_sharpness"),
    "posterize": Posterize(),
    "solarize": Solarize(),
    "autocontrast": AutoContrast(),
    "equalize": Equalize(),
}
