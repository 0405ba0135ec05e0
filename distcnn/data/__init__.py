"""Datasets as uint8 tensors held in memory: one factory, ``load_data(spec)``, for every kind.

Kinds: ``fashion-mnist`` (the IDX files), ``imagefolder:PATH`` (one folder per class), ``synthetic[:k=v,...]``
(generated, for tests). Each kind yields a pool of labelled images; ``splits`` cuts it into train / val / test;
the images are then brought to ``image_size`` and the train set's per-channel mean and std computed. Bad input
raises ``UsageError`` with one line saying what to change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distcnn.data import fashion_mnist, imagefolder, synthetic
from distcnn.data.splits import DataSplits, ImageSet, Pool, channel_stats, choose_splits
from distcnn.errors import UsageError, unknown

__all__ = ["DATA_KINDS", "DataSplits", "ImageSet", "load_data"]

DATA_KINDS = ("fashion-mnist", "imagefolder:PATH", "synthetic")
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 4, 1024
RESIZE_CHUNK = 2048  # images resized at a time, bounding the float working set


def load_data(
    spec: str,
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
    train_subset: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    download: bool = False,
    cache_dir: str | None = None,
) -> DataSplits:
    """Load, split and describe a dataset.

    ``image_size`` None keeps the data's own size (Fashion-MNIST 28, synthetic 28, an image folder the most
    common shorter side of its images, at most 224). ``val_fraction`` / ``test_fraction`` are shares of the
    images a set is cut from (``test_fraction`` is used only when the data has no test set of its own);
    ``train_subset`` is a stratified subset of the training images left after that. ``split_seed`` fixes the
    cut. ``download`` lets Fashion-MNIST be fetched when it is not found; nothing is downloaded otherwise.
    ``cache_dir`` is where decoded image folders are kept (default ``$DISTCNN_CACHE/imagefolder`` or
    ``~/.cache/distcnn/imagefolder``).
    """
    check_options(image_size, val_fraction, test_fraction)
    pool = open_pool(spec, data_dir=data_dir, image_size=image_size, download=download, cache_dir=cache_dir)
    chosen = choose_splits(
        pool, val_fraction=val_fraction, test_fraction=test_fraction, train_subset=train_subset, split_seed=split_seed
    )
    parts = (chosen.train, chosen.val, chosen.test)
    images = pool.gather(parts)
    if image_size is not None:
        images = [resize_square(batch, image_size) for batch in images]
    train, val, test = (ImageSet(batch, pool.labels[indices]) for batch, indices in zip(images, parts))
    mean, std = channel_stats(train.images)
    return DataSplits(
        name=pool.name,
        source=pool.source,
        classes=pool.classes,
        channels=train.images.shape[1],
        image_size=train.images.shape[2],
        train=train,
        val=val,
        test=test,
        mean=mean,
        std=std,
    )


def check_options(image_size: int | None, val_fraction: float, test_fraction: float) -> None:
    """The options every kind shares, checked before anything is read."""
    if image_size is not None and not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise UsageError(f"image_size {image_size} is out of range; allowed: {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}")
    if not 0 <= val_fraction < 0.5:
        raise UsageError(f"val_fraction {val_fraction} is out of range; allowed: 0 (no validation set) up to 0.5")
    if not 0 < test_fraction < 0.5:
        raise UsageError(f"test_fraction {test_fraction} is out of range; allowed: above 0, below 0.5")


def open_pool(
    spec: str, *, data_dir: str | None, image_size: int | None, download: bool, cache_dir: str | None
) -> Pool:
    """Dispatch on the kind named before the first ':'; what follows is the kind's argument."""
    kind, _, argument = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "fashion-mnist":
        if argument:
            raise UsageError(f"fashion-mnist takes no options (got {spec!r}); give its folder with --data-dir DIR")
        return fashion_mnist.load_pool(data_dir, download)
    if kind == "imagefolder":
        path = argument or data_dir
        if not path:
            raise UsageError("imagefolder needs a folder: imagefolder:PATH (or imagefolder with --data-dir DIR)")
        return imagefolder.load_pool(path, image_size, cache_dir)
    if kind == "synthetic":
        return synthetic.load_pool(argument, image_size)
    raise unknown("dataset", kind or spec, DATA_KINDS)


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square uint8 images to ``size`` x ``size``: antialiased bilinear, rounded back to uint8, in chunks.
    Unchanged (no copy) when they already have that size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.empty(*images.shape[:2], size, size, dtype=torch.uint8)
    for start in range(0, images.shape[0], RESIZE_CHUNK):
        block = images[start : start + RESIZE_CHUNK].float()
        resized = F.interpolate(block, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + RESIZE_CHUNK] = resized.round().clamp(0, 255).to(torch.uint8)
    return out
