"""The policy spec: what a policy is made of.

A **policy** (distcnn.augment.policies.Policy) is data: a sequence of slots, each a tuple of ops (`Op`: a kind of
transform and the range its strength is drawn from). In every slot each image picks one of the slot's ops
uniformly and applies it with that op's probability. "Each op with probability p" (`paper`, `flip-crop`) is a
run of one-op slots (`each`); "choose k ops of a space" (`trivialaugment`, `randaugment`) is k slots holding the
whole space (`choose`).
"""

from __future__ import annotations

from dataclasses import dataclass


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


def each(*ops: Op) -> tuple[Slot, ...]:
    """Apply every op in turn, each with its own probability."""
    return tuple(Slot((op,)) for op in ops)


def choose(k: int, ops: tuple[Op, ...]) -> tuple[Slot, ...]:
    """Per image, k ops drawn uniformly with replacement from `ops`, applied in the order drawn."""
    return (Slot(ops),) * k
