"""Cutting images into a grid of subimages (the subdomains of a CNN-DNN) and putting them back.

A P×Q grid cuts every image of a batch into P·Q subimages of one size, so each local CNN sees a fixed input
shape and all of them are cut in one indexing operation on the device, after augmentation of the whole image.

Size rule: a subimage is ceil(H/P) + overlap rows high (and likewise wide), never more than the image. The
subimages are spread evenly from the first row to the last: start_i = round(i · (H − h) / (P − 1)). When P
divides H and there is no overlap, this is the plain partition; when it does not, neighbouring subimages
overlap by the few rows left over, so no pixel is dropped and every subimage keeps the same shape. With an
overlap of o pixels, neighbours share a band at least o pixels wide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distcnn.errors import UsageError


@dataclass(frozen=True)
class Grid:
    rows: int
    cols: int
    overlap: int = 0

    @classmethod
    def parse(cls, text: str, overlap: int = 0) -> "Grid":
        """'2x2' or '4X4' -> Grid; one clear line for anything else."""
        parts = text.lower().replace("×", "x").split("x")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise UsageError(f"--grid {text!r}: give PxQ with whole numbers, e.g. 2x2 or 4x4")
        rows, cols = (int(part) for part in parts)
        if rows < 1 or cols < 1:
            raise UsageError(f"--grid {text!r}: both sides must be at least 1")
        if overlap < 0:
            raise UsageError(f"--overlap must be 0 or more pixels, got {overlap}")
        return cls(rows, cols, overlap)

    @property
    def count(self) -> int:
        return self.rows * self.cols

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"

    def layout(self, height: int, width: int) -> "Layout":
        """Where each subimage lies in an image of this size; UsageError when the grid cannot cut it."""
        if self.rows > height or self.cols > width:
            raise UsageError(f"--grid {self}: larger than the {height}×{width} image (at most {height}x{width})")
        size_y, size_x = math.ceil(height / self.rows), math.ceil(width / self.cols)
        if self.overlap >= min(size_y, size_x):
            raise UsageError(f"--overlap {self.overlap}: as large as a subimage ({size_y}×{size_x} px at grid "
                             f"{self.rows}x{self.cols}); use at most {min(size_y, size_x) - 1}")
        h, w = min(height, size_y + self.overlap), min(width, size_x + self.overlap)
        return Layout(height, width, h, w, _starts(height, h, self.rows), _starts(width, w, self.cols))


def _starts(length: int, size: int, parts: int) -> list[int]:
    if parts == 1:
        return [0]
    return [round(i * (length - size) / (parts - 1)) for i in range(parts)]


@dataclass(frozen=True)
class Layout:
    height: int
    width: int
    sub_height: int
    sub_width: int
    row_starts: list[int]
    col_starts: list[int]

    @property
    def boxes(self) -> list[tuple[int, int]]:
        """(top, left) of every subimage, row-major: subdomain k is row k // Q, column k % Q."""
        return [(top, left) for top in self.row_starts for left in self.col_starts]

    def share(self) -> float:
        """The fraction of the image's pixels one subimage holds (what a local CNN's size follows)."""
        return self.sub_height * self.sub_width / (self.height * self.width)
