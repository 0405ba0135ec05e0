"""Small datasets written to disk for tests: image folders a tiny CNN can learn, and IDX files."""

from __future__ import annotations

import colorsys
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

IDX_TYPE_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
                  np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
HELPER_MODES = ("RGB", "RGBA", "L", "LA", "I;16")


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file, gzipped when the name ends in .gz (the inverse of read_idx)."""
    big_endian = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    code = IDX_TYPE_CODES[big_endian.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(big_endian).tobytes()
    path.write_bytes(gzip.compress(payload, compresslevel=1) if path.suffix == ".gz" else payload)
    return path


def class_image(rng: np.random.Generator, label: int, classes: int, size: int) -> np.ndarray:
    """(size, size, 3) float RGB in [0, 255]: a square of the class's colour at the class's place in a 3x3
    grid, jittered, on a grey background, all under pixel noise. Colour alone or place alone identifies the
    class (place still does in grayscale), so a tiny CNN learns it in a few steps; noise keeps it from being
    a lookup."""
    colour = np.array(colorsys.hsv_to_rgb(label / classes, 0.9, 0.95)) * 255
    side = max(2, size // 3)
    cell_row, cell_col = divmod(label % 9, 3)
    jitter = max(1, size // 16)
    top = int(np.clip(cell_row * (size - side) / 2 + rng.integers(-jitter, jitter + 1), 0, size - side))
    left = int(np.clip(cell_col * (size - side) / 2 + rng.integers(-jitter, jitter + 1), 0, size - side))
    image = np.full((size, size, 3), 110.0)
    image[top : top + side, left : left + side] = colour
    return np.clip(image + rng.normal(0, 20, image.shape), 0, 255)


def to_mode(rgb: np.ndarray, mode: str) -> Image.Image:
    """A PIL image of the given mode from float RGB in [0, 255]."""
    rgb8 = np.rint(rgb).astype(np.uint8)
    grey = np.rint(rgb @ np.array([0.299, 0.587, 0.114]))
    alpha = np.full(rgb.shape[:2], 200, dtype=np.uint8)
    if mode == "RGB":
        return Image.fromarray(rgb8, "RGB")
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb8, alpha]), "RGBA")
    if mode == "L":
        return Image.fromarray(grey.astype(np.uint8), "L")
    if mode == "LA":
        return Image.fromarray(np.dstack([grey.astype(np.uint8), alpha]), "LA")
    if mode == "I;16":
        return Image.fromarray((grey * 257).astype(np.uint16))  # 16-bit grey: mode I;16
    raise ValueError(f"mode {mode!r} not supported by make_imagefolder; use one of {HELPER_MODES}")


def write_classes(folder: Path, classes: int, per_class: int, size: int, mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for label in range(classes):
        class_dir = folder / f"class{label}"
        class_dir.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            to_mode(class_image(rng, label, classes, size), mode).save(class_dir / f"img{k:04d}.png")


def make_imagefolder(
    root: Path, classes: int = 3, per_class: int = 40, size: int = 32, mode: str = "RGB", splits: bool = False
) -> Path:
    """Write a learnable image folder of PNGs under ``root`` and return ``root``.

    Classes are ``class0``, ``class1``, ... With ``splits`` the folder has ``train/`` (``per_class`` images per
    class), ``val/`` and ``test/`` (``max(2, per_class // 4)`` each); otherwise the class folders sit directly
    in ``root``. Deterministic: the same arguments write the same pixels.
    """
    root = Path(root)
    if splits:
        held_out = max(2, per_class // 4)
        write_classes(root / "train", classes, per_class, size, mode, seed=1)
        write_classes(root / "val", classes, held_out, size, mode, seed=2)
        write_classes(root / "test", classes, held_out, size, mode, seed=3)
    else:
        write_classes(root, classes, per_class, size, mode, seed=0)
    return root
