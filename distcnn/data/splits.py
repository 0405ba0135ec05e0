"""From a pool of labelled images to train / validation / test sets.

Every dataset kind hands over a :class:`Pool` — all its images (or a way to fetch them) with labels, and the
parts its files already fix (Fashion-MNIST's t10k test set, an ImageFolder's ``val/`` folder). This module
decides, from the labels alone, which index goes where: the parts the data does not fix are cut out of the
training pool by a stratified, seeded split (:func:`stratified_split`), the validation set first so that it does
not depend on ``train_subset``, then the training subset from what is left.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distcnn.errors import UsageError


@dataclass(repr=False)
class ImageSet:
    """Images and labels held in memory, so a batch is gathered by indexing (no per-sample decode)."""

    images: torch.Tensor  # uint8 (N, C, H, W), H == W
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:  # the default would print the tensors
        return f"ImageSet(n={len(self)}, shape={tuple(self.images.shape)})"


@dataclass
class DataSplits:
    """A dataset ready to train on: its three sets and what the run record needs to describe it."""

    name: str  # "fashion-mnist", "imagefolder", "synthetic"
    source: str  # where it came from (a path or a description), written into the run record
    classes: list[str]
    channels: int
    image_size: int
    train: ImageSet
    val: ImageSet
    test: ImageSet
    mean: tuple[float, ...]  # per channel, of the train images scaled to [0, 1]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def take_by_index(images: torch.Tensor) -> Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]:
    """The plain way to fetch a split's images from a pool that is already in memory."""
    return lambda parts: [images[indices] for indices in parts]


@dataclass
class Pool:
    """Everything a dataset kind offers, before splitting.

    ``train`` indexes the training pool; ``val`` / ``test`` index the parts the data already fixes, or are None
    when they must be cut from the training pool. ``gather`` turns index tensors into uint8 image tensors; it is
    a function so that a kind may decode or lay out its images only once it knows what is needed.
    """

    name: str
    source: str
    classes: list[str]
    labels: torch.Tensor
    gather: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]
    train: torch.Tensor
    val: torch.Tensor | None = None
    test: torch.Tensor | None = None


def class_quotas(class_counts: np.ndarray, total: int) -> np.ndarray:
    """How many of ``total`` items each class gets: proportional, largest remainder first, so the sum is exact
    and every class is within one item of its exact share."""
    class_counts = np.asarray(class_counts, dtype=np.int64)
    available = int(class_counts.sum())
    if not 0 <= total <= available:
        raise ValueError(f"cannot take {total} of {available} items")
    if available == 0:
        return np.zeros_like(class_counts)
    exact = class_counts * (total / available)
    quotas = np.floor(exact).astype(np.int64)
    short = total - int(quotas.sum())
    # Ties broken by class index (stable sort), so the result is deterministic.
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[:short]] += 1
    return quotas


def stratified_split(
    indices: torch.Tensor, labels: torch.Tensor, sizes: Sequence[int], generator: torch.Generator
) -> list[torch.Tensor]:
    """Cut ``indices`` into ``len(sizes)`` stratified parts of the given sizes plus the rest (returned last).

    Each class's members are shuffled once with ``generator`` and cut in order, so with the same generator
    state the first parts do not depend on the sizes of later ones. Every part comes back sorted.
    """
    pool_labels = labels[indices]
    classes = torch.unique(pool_labels).tolist()
    members = [indices[pool_labels == c] for c in classes]
    counts = np.array([len(m) for m in members])
    quotas = [class_quotas(counts, size) for size in sizes]
    parts: list[list[torch.Tensor]] = [[] for _ in range(len(sizes) + 1)]
    for k, class_members in enumerate(members):
        shuffled = class_members[torch.randperm(len(class_members), generator=generator)]
        start = 0
        for part, quota in zip(parts, quotas):
            part.append(shuffled[start : start + quota[k]])
            start += int(quota[k])
        parts[-1].append(shuffled[start:])
    return [torch.sort(torch.cat(p)).values if p else indices[:0] for p in parts]


@dataclass
class SplitIndices:
    """Pool indices of each set, sorted."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def choose_splits(
    pool: Pool, *, val_fraction: float, test_fraction: float, train_subset: int | None, split_seed: int
) -> SplitIndices:
    """Decide which pool indices form train, val and test.

    Fractions are of the images a part is cut from: when the data has no test set, test is ``test_fraction``
    and val ``val_fraction`` of the whole training pool (one stratified cut, e.g. 70/10/20); when it has one,
    val is ``val_fraction`` of the training pool. Validation is cut before ``train_subset`` is drawn, so the
    same ``split_seed`` gives the same validation set whatever the subset.
    """
    generator = torch.Generator().manual_seed(split_seed)
    labels = pool.labels
    remaining, val, test = pool.train, pool.val, pool.test
    n = len(remaining)
    cut_sizes = {}
    if test is None:
        cut_sizes["test"] = round(n * test_fraction)
    if val is None:
        cut_sizes["val"] = round(n * val_fraction)
    if cut_sizes:
        *cut, remaining = stratified_split(remaining, labels, list(cut_sizes.values()), generator)
        cut_parts = dict(zip(cut_sizes, cut))
        test = cut_parts.get("test", test)
        val = cut_parts.get("val", val)

    num_classes = len(pool.classes)
    if train_subset is not None:
        if not num_classes <= train_subset <= len(remaining):
            raise UsageError(
                f"train_subset {train_subset} is out of range; allowed: {num_classes} (one per class) to "
                f"{len(remaining)} (the training images left after the validation and test splits)"
            )
        remaining = stratified_split(remaining, labels, [train_subset], generator)[0]

    counts = torch.bincount(labels[remaining], minlength=num_classes)
    if (counts == 0).any():
        missing = [pool.classes[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
        raise UsageError(
            f"no training images left for class {missing[0]!r} after the validation and test splits; "
            "add images to it or lower --val-fraction / --test-fraction"
        )
    return SplitIndices(train=remaining, val=val, test=test)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images scaled to [0, 1].

    Computed from each channel's histogram of the 256 byte values: exact, independent of the order of the
    images, and about twenty times faster than summing a float copy."""
    levels = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in range(images.shape[1]):
        histogram = torch.zeros(256, dtype=torch.int64)
        for start in range(0, images.shape[0], chunk):
            histogram += torch.bincount(images[start : start + chunk, channel].reshape(-1), minlength=256)
        weights = histogram.to(torch.float64) / histogram.sum()
        mean = float((weights * levels).sum())
        means.append(mean)
        stds.append(float((weights * (levels - mean).square()).sum().sqrt()))
    return tuple(means), tuple(stds)
