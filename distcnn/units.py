"""How figures read: bytes in KiB/MiB/GiB, durations in s/min/h, a column of figures in one unit with sensible
significant figures. Plain Python, for every printer and page. A unit here is the one distcnn.summary declares
for the figure (`summary.unit(name)`): this module only says how it reads."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
# how a declared unit is written after a figure's name: accuracies are fractions 0..1
LABELS = {"fraction": "0–1", "parameters": "count", "": ""}


def human_bytes(value: float) -> str:
    for unit in BYTE_UNITS:
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024


def duration(seconds: float) -> str:
    """`42 s`, `3.5 min`, `2.1 h`."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Scale:
    """One unit for a whole column (or row) of figures: what it is written as, what a figure is divided by,
    and how many decimals every figure of it gets, so the column reads aligned."""

    label: str
    divisor: float
    decimals: int

    def text(self, value, decimals: int | None = None) -> str:
        """A figure in this scale, `n/a` for one that was not measured (never 0)."""
        if not finite(value):
            return "n/a"
        places = self.decimals if decimals is None else decimals
        return f"{value / self.divisor:,.{places}f}"


def decimals_for(magnitude: float, digits: int = 4) -> int:
    """Decimals that give `digits` significant figures to a figure of this magnitude (none for large ones)."""
    if not magnitude or not math.isfinite(magnitude):
        return 0
    return max(0, digits - 1 - math.floor(math.log10(abs(magnitude))))


def scale(values: Iterable, unit: str, digits: int = 4) -> Scale:
    """The scale a column of figures in `unit` reads best in: bytes in the one binary unit its largest figure
    needs (every figure of the column in MiB, say); fractions to 4 decimals; percentages to 1; anything else
    to `digits` significant figures of its typical (median) figure."""
    present = sorted(abs(float(value)) for value in values if finite(value))
    typical = present[len(present) // 2] if present else 0.0
    if unit in ("B", "B/s"):
        largest = present[-1] if present else 0.0
        power = 0
        while power < len(BYTE_UNITS) - 1 and largest >= 1024 ** (power + 1):
            power += 1
        name = BYTE_UNITS[power] + ("/s" if unit == "B/s" else "")
        decimals = 0 if power == 0 else min(decimals_for(typical / 1024**power, 4), 3)
        return Scale(name, 1024.0**power, decimals)
    if unit == "fraction":
        return Scale(LABELS[unit], 1.0, 4)
    if unit == "%":
        return Scale("%", 1.0, 1 if typical >= 1 else decimals_for(typical, 2))
    if unit in ("images", "epochs", "parameters", "ranks", "pixels") and all(float(v).is_integer() for v in present):
        return Scale(LABELS.get(unit, unit), 1.0, 0)
    return Scale(LABELS.get(unit, unit), 1.0, min(decimals_for(typical, digits), 8))


def with_unit(name: str, label: str) -> str:
    """A column or row header: `train_seconds (s)`; the name alone where the figure has no unit."""
    return f"{name} ({label})" if label else name
