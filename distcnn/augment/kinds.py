"""Every op kind by name: the geometric ones (distcnn.augment.ops, with the kinds' base) and the colour ones
(distcnn.augment.colour). A policy's op names one of these (distcnn.augment.policies)."""

from __future__ import annotations

from distcnn.augment.colour import COLOUR_KINDS
from distcnn.augment.ops import GEOMETRIC_KINDS, Kind

KINDS: dict[str, Kind] = GEOMETRIC_KINDS | COLOUR_KINDS
