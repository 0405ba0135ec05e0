"""From resident uint8 images to augmented, normalised batches on the training device.

This is where an image is augmented. Two routes, chosen by the augmentation backend:
- batched: batches are gathered by index from the resident uint8 tensor (one indexing op per batch, no
  per-image Python), moved to the device, and augmented there as a whole batch (kornia);
- per-sample: a DataLoader whose workers augment image by image (torchvision v2), as most training
  scripts do; the device only normalises.
Both shard the training set over ranks with DistributedSampler (also for one rank: one code path).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from distcnn.augment import build_augment, build_batch_mix
from distcnn.config import TrainConfig, available_cores
from distcnn.data import DataSplits, ImageSet
from distcnn.parallel import Ranks


class ResidentBatches:
    """Batches of (uint8 images, labels) gathered by index from an ImageSet held in memory.

    `indices` is anything with a length that iterates over image indices: a fixed list (evaluation shards)
    or a DistributedSampler (re-drawn each epoch)."""

    def __init__(self, images: ImageSet, batch_size: int, indices, drop_last: bool = False):
        self.images = images
        self.batch_size = batch_size
        self.indices = indices
        self.drop_last = drop_last

    def __len__(self) -> int:
        full, rest = divmod(len(self.indices), self.batch_size)
        return full if (self.drop_last and full) else full + (1 if rest else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = torch.as_tensor(list(self.indices), dtype=torch.long)
        for step in range(len(self)):
            batch = indices[step * self.batch_size : (step + 1) * self.batch_size]
            yield self.images.images[batch], self.images.labels[batch]


class PerSampleImages(Dataset):
    """One image at a time through a per-sample transform, for DataLoader workers."""

    def __init__(self, images: ImageSet, transform):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images.images[index]), self.images.labels[index]


class Normalise:
    """uint8 images on the device -> float, scaled to [0, 1] (then `standardise` by the train set's statistics)."""

    def __init__(self, mean, std, device: torch.device):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    @staticmethod
    def to_unit(images: torch.Tensor) -> torch.Tensor:
        return images.float().div_(255)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def default_workers(ranks: Ranks) -> int:
    """Per-sample augmentation needs CPU workers; share the machine's cores among the local ranks."""
    return max(1, available_cores() // ranks.local_world_size)


class TrainInputs:
    """One epoch of training batches for this rank: augmented, normalised, on the device."""

    def __init__(self, splits: DataSplits, config: TrainConfig, ranks: Ranks):
        self.device = ranks.device
        self.normalise = Normalise(splits.mean, splits.std, ranks.device)
        self.sampler = DistributedSampler(
            splits.train, num_replicas=ranks.world_size, rank=ranks.rank, shuffle=True, seed=config.seed
        )
        # Drop a last partial batch (BatchNorm cannot train on one image), unless it is the only batch.
        drop_last = len(self.sampler) >= config.batch_size
        augment = build_augment(config.policy, config.aug_backend, splits.channels, splits.image_size,
                                config.aug_strength)
        self.batched_augment = None
        if config.aug_backend == "per-sample":
            workers = config.workers if config.workers is not None else default_workers(ranks)
            transform = augment if augment is not None else _identity
            self.batches = DataLoader(
                PerSampleImages(splits.train, transform),
                batch_size=config.batch_size,
                sampler=self.sampler,
                drop_last=drop_last,
                num_workers=workers,
                persistent_workers=workers > 0,
                pin_memory=ranks.device.type == "cuda",
            )
        else:
            self.batched_augment = augment
            self.batches = ResidentBatches(splits.train, config.batch_size, self.sampler, drop_last=drop_last)
        self.mix = build_batch_mix(config.mixup, config.cutmix, splits.num_classes)

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's raw batches on the device (per-sample: already augmented by the workers)."""
        for images, labels in self.batches:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def prepare(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A raw batch -> model input and targets: batched augmentation, normalisation, MixUp/CutMix."""
        x = self.normalise.to_unit(images)
        if self.batched_augment is not None:
            x = self.batched_augment(x)
        x = self.normalise.standardise(x)
        if self.mix is not None:
            x, labels = self.mix(x, labels)
        return x, labels


def _identity(image: torch.Tensor) -> torch.Tensor:
    return image


class EvalInputs:
    """This rank's share of an evaluation set (every world_size-th image, no padding: counts stay exact).

    `shift(x, index)` (distcnn.shifts.Shift), when given, changes the images in [0, 1] before normalisation;
    it is told which images of the set it has, so a shifted image does not depend on batches or ranks."""

    def __init__(self, images: ImageSet, mean, std, batch_size: int, ranks: Ranks, shift=None):
        self.device = ranks.device
        self.normalise = Normalise(mean, std, ranks.device)
        self.shard = torch.arange(ranks.rank, len(images), ranks.world_size)
        self.batch_size, self.shift = batch_size, shift
        self.batches = ResidentBatches(images, batch_size, self.shard.tolist())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, (images, labels) in enumerate(self.batches):
            x = self.normalise.to_unit(images.to(self.device, non_blocking=True))
            if self.shift is not None:
                x = self.shift(x, self.shard[step * self.batch_size : (step + 1) * self.batch_size])
            yield self.normalise.standardise(x), labels.to(self.device, non_blocking=True)
