"""Fashion-MNIST from its original IDX files, parsed with numpy (a whole split is one ``frombuffer``).

IDX format (LeCun's MNIST page): two zero bytes, a type code, the number of dimensions, then one big-endian
int32 per dimension, then the values, big-endian, row-major. Files may be gzipped (recognised by their first
bytes, not their name).
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from distcnn.data.splits import Pool, take_by_index
from distcnn.errors import UsageError

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

IDX_TYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in an IDX file (gzipped or not); UsageError naming the file if it is not valid IDX."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise UsageError(f"cannot read IDX file {path}: {err}; download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise UsageError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'none'}); download it again")
    dtype, ndim = IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UsageError(f"IDX file {path} is truncated (header cut short); download it again")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        problem = "is truncated" if len(raw) < expected else "has trailing bytes"
        raise UsageError(
            f"IDX file {path} {problem} ({len(raw)} bytes, shape {shape} needs {expected}); download it again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def download_root() -> Path:
    """Where --download puts the files (torchvision layout below it): $DISTCNN_CACHE or ~/.cache/distcnn."""
    return Path(os.environ.get("DISTCNN_CACHE") or Path.home() / ".cache" / "distcnn").expanduser()


def candidate_dirs(data_dir: str | None) -> list[Path]:
    """Folders that may hold the four files, in the order they are tried."""
    if data_dir is not None:
        base = Path(data_dir).expanduser()
        return [base, base / "FashionMNIST" / "raw"]
    return [SYSTEM_DIR, download_root() / "FashionMNIST" / "raw"]


def find_files(folder: Path) -> dict[str, Path] | None:
    """The four files in ``folder`` (plain preferred over .gz: no decompression), or None if any is missing."""
    found = {}
    for key, name in FILES.items():
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def locate(data_dir: str | None, download: bool) -> dict[str, Path]:
    """Find the files, downloading them with torchvision only when asked to."""
    folders = candidate_dirs(data_dir)
    for folder in folders:
        if files := find_files(folder):
            return files
    if download:
        root = Path(data_dir).expanduser() if data_dir is not None else download_root()
        fetch(root)
        if files := find_files(root / "FashionMNIST" / "raw"):
            return files
    looked_for = ", ".join(f"{name}.gz" for name in FILES.values())
    raise UsageError(
        f"Fashion-MNIST not found in {' or '.join(str(f) for f in folders)} (looked for {looked_for}); "
        "install it: apt-get install -y dataset-fashion-mnist — or pass --data-dir DIR, or --download"
    )


def fetch(root: Path) -> None:
    """Download through torchvision into ``root/FashionMNIST/raw``."""
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(root=str(root), train=True, download=True)
    except Exception as err:  # network and disk errors come in many types; all mean the same to the user
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UsageError(
            f"could not download Fashion-MNIST into {root}: {reason}; "
            "install it instead: apt-get install -y dataset-fashion-mnist — or pass --data-dir DIR"
        ) from None


def read_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One split's images (N, H, W) and labels, both uint8, checked against each other."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise UsageError(f"{images_path} does not hold square uint8 images (shape {images.shape}, {images.dtype})")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise UsageError(f"{labels_path} does not hold uint8 labels (shape {labels.shape}, {labels.dtype})")
    if len(images) != len(labels):
        raise UsageError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if len(labels) and labels.max() >= len(CLASSES):
        raise UsageError(f"{labels_path} has label {labels.max()}; Fashion-MNIST labels are 0..{len(CLASSES) - 1}")
    return images, labels


def load_pool(data_dir: str | None, download: bool) -> Pool:
    """The 60,000 training images as the pool and t10k as the fixed test set."""
    files = locate(data_dir, download)
    train_images, train_labels = read_split(files["train_images"], files["train_labels"])
    test_images, test_labels = read_split(files["test_images"], files["test_labels"])
    if train_images.shape[1:] != test_images.shape[1:]:
        raise UsageError(
            f"{files['train_images']} and {files['test_images']} hold images of different sizes "
            f"({train_images.shape[1:]} and {test_images.shape[1:]})"
        )
    n_train, n_test = len(train_labels), len(test_labels)
    # One concatenation copies the read-only frombuffer views into one ordinary, writable array.
    images = torch.from_numpy(np.concatenate([train_images, test_images])).unsqueeze(1)
    labels = torch.from_numpy(np.concatenate([train_labels, test_labels]).astype(np.int64))
    return Pool(
        name="fashion-mnist",
        source=str(files["train_images"].parent),
        classes=list(CLASSES),
        labels=labels,
        gather=take_by_index(images),
        train=torch.arange(n_train),
        test=torch.arange(n_train, n_train + n_test),
    )
