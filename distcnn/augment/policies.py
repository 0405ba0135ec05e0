"""The named policies: `Policy`, the registry (`register_policy`, `POLICIES`, `get_policy`) and its entries.

Decisions (each also stated where it is implemented):
- `paper` shear 0.2 is a shear *angle* of up to 0.2 rad (11.5 degrees) in x, as Keras' `shear_range`; it is
  applied as the factor tan(phi), drawn uniformly in +-tan(0.2) (over that range tan is linear within 1.4 %).
- `paper` colour jitter applies brightness, contrast, saturation in this fixed order (torchvision's
  ColorJitter permutes them per call), factors uniform in [0.8, 1.2]; saturation is dropped on 1 channel.
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

Policy sits here rather than beside Op and Slot in spec.py: scaling and channel selection ask each op's kind
(distcnn.augment.kinds.KINDS), and the kinds are written in terms of Op.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from distcnn.augment.kinds import KINDS
from distcnn.augment.spec import Op, Slot, choose, each
from distcnn.errors import UsageError, unknown


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


_REGISTRY: dict[str, Policy] = {}


def register_policy(fn: Callable[[], tuple[Slot, ...]]) -> Callable[[], tuple[Slot, ...]]:
    """Register a policy under its function's name (underscores become dashes); its docstring describes it."""
    name = fn.__name__.replace("_", "-")
    _REGISTRY[name] = Policy(name, tuple(fn()), (fn.__doc__ or "").strip())
    return fn


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
    """The cost study's recipe: rotation +-5 deg, shear angle up to 0.2 rad in x, translation
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
