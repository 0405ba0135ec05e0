"""From resident uint8 images to augmented, normalised batches on the training device.

This is where an image is augmented. Two routes, chosen by the augmentation backend:
- batched: batches are gathered by index from the resident uint8 tensor (one indexing op per batch, no
  per-image Python) and augmented on the device as a whole batch. On a GPU the uint8 set itself lives on
  the GPU when it takes at most a quarter of the free memory (`on_device`): a batch is then one gather on
  the device, with no host copy and no host synchronisation; otherwise batches are gathered into pinned
  memory and copied asynchronously.
- per-sample: a DataLoader whose workers augment image by image (torchvision v2), as most training
  scripts do: each worker is handed a whole batch of indices (`__getitems__`) and draws that batch's random
  parameters at once, then transforms image by image; persistent workers, prefetching, pinned memory and
  non-blocking copies. The device only normalises.
Both shard the training set over ranks with DistributedSampler (also for one rank: one code path). The
model input leaves here in the run's memory format (channels-last or contiguous).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from distcnn.augment import build_augment, build_batch_mix
from distcnn.config import TrainConfig, available_cores
from distcnn.data import DataSplits, ImageSet
from distcnn.parallel.ranks import Ranks


DEVICE_SHARE = 0.25  # the most of a GPU's free memory a resident uint8 image set may take
_ON_DEVICE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # host images tensor -> its device ImageSet


def on_device(images: ImageSet, device: torch.device) -> ImageSet:
    """The set where batches are gathered from: a copy on the GPU, made once and shared by every reader (train,
    validation, test), when it fits in DEVICE_SHARE of the free memory; else the set itself, in pinned host
    memory on a GPU run (asynchronous copies) or as it is on the CPU."""
    if device.type != "cuda":
        return images
    cached = _ON_DEVICE.get(images.images)
    if cached is not None and cached.images.device == device:
        return cached
    free, _ = torch.cuda.mem_get_info(device)
    if images.images.nbytes + images.labels.nbytes <= DEVICE_SHARE * free:
        cached = ImageSet(images.images.to(device), images.labels.to(device))
    else:
        cached = ImageSet(images.images.pin_memory(), images.labels.pin_memory())
    _ON_DEVICE[images.images] = cached
    return cached


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
        # the epoch's indices go where the images are, once: each batch is then one gather there
        indices = torch.as_tensor(list(self.indices), dtype=torch.long).to(self.images.images.device)
        pinned = self.images.images.is_pinned()  # a GPU run's set too large for the GPU: keep copies async
        for step in range(len(self)):
            batch = indices[step * self.batch_size : (step + 1) * self.batch_size]
            images, labels = self.images.images[batch], self.images.labels[batch]
            yield (images.pin_memory(), labels.pin_memory()) if pinned else (images, labels)


class PerSampleImages(Dataset):
    """One image at a time through a per-sample transform, for DataLoader workers."""

    def __init__(self, images: ImageSet, transform):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images.images[index]), self.images.labels[index]

    def __getitems__(self, indices: list[int]):
        """A whole batch for one worker: the transform draws the batch's parameters at once (augment_many),
        then works image by image; the DataLoader's collate stacks the images."""
        index = torch.as_tensor(indices, dtype=torch.long)
        many = getattr(self.transform, "augment_many", None)
        images = self.images.images[index]
        images = many(images) if many is not None else torch.stack([self.transform(image) for image in images])
        return list(zip(images.unbind(0), self.images.labels[index].unbind(0)))


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


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Asynchronous where it can be: from pinned memory to a GPU the copy does not wait."""
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=tensor.is_pinned())


def default_workers(ranks: Ranks) -> int:
    """Per-sample augmentation needs CPU workers; share the machine's cores among the local ranks."""
    return max(1, available_cores() // ranks.local_world_size)


class TrainInputs:
    """One epoch of training batches for this rank: augmented, normalised, on the device."""

    PREFETCH = 4  # batches each per-sample worker prepares ahead

    def __init__(self, splits: DataSplits, config: TrainConfig, ranks: Ranks,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.device, self.memory_format = ranks.device, memory_format
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
                prefetch_factor=self.PREFETCH if workers > 0 else None,
                pin_memory=ranks.device.type == "cuda",
            )
        else:
            self.batched_augment = augment
            if augment is not None and config.compile != "off" and ranks.device.type == "cuda":
                # on a GPU its hundred-odd small kernels become a few; on the CPU the compiled augmentation
                # measured slower than the eager one (in-place ops there), so it stays eager
                self.batched_augment = torch.compile(augment, fullgraph=True, dynamic=False)
            self.batches = ResidentBatches(on_device(splits.train, ranks.device), config.batch_size, self.sampler,
                                           drop_last=drop_last)
        self.batch_shape = (min(config.batch_size, len(self.sampler)), splits.channels, splits.image_size,
                            splits.image_size)
        self.mix = build_batch_mix(config.mixup, config.cutmix, splits.num_classes)

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's raw batches on the device (per-sample: already augmented by the workers)."""
        for images, labels in self.batches:
            yield to_device(images, self.device), to_device(labels, self.device)

    def prepare(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A raw batch -> model input and targets: batched augmentation, normalisation, MixUp/CutMix."""
        x = self.normalise.to_unit(images)
        if self.batched_augment is not None:
            x = self.batched_augment(x)
        x = self.normalise.standardise(x)
        if self.mix is not None:
            x, labels = self.mix(x, labels)
        return x.contiguous(memory_format=self.memory_format), labels


def _identity(image: torch.Tensor) -> torch.Tensor:
    return image


class EvalInputs:
    """This rank's share of an evaluation set (every world_size-th image, no padding: counts stay exact).

    `shift(x, index)` (distcnn.shifts.Shift), when given, changes the images in [0, 1] before normalisation;
    it is told which images of the set it has, so a shifted image does not depend on batches or ranks."""

    def __init__(self, images: ImageSet, mean, std, batch_size: int, ranks: Ranks, shift=None,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.device, self.memory_format = ranks.device, memory_format
        self.normalise = Normalise(mean, std, ranks.device)
        self.shard = torch.arange(ranks.rank, len(images), ranks.world_size)
        self.batch_size, self.shift = batch_size, shift
        self.batches = ResidentBatches(on_device(images, ranks.device), batch_size, self.shard.tolist())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, (images, labels) in enumerate(self.batches):
            x = self.normalise.to_unit(to_device(images, self.device))
            if self.shift is not None:
                x = self.shift(x, self.shard[step * self.batch_size : (step + 1) * self.batch_size])
            x = self.normalise.standardise(x).contiguous(memory_format=self.memory_format)
            yield x, to_device(labels, self.device)


EVAL_INPUT_BYTES = 32 << 20  # float input of one evaluation batch, at most (unless the training batch is larger)


def eval_batch_size(train_batch: int, channels: int, image_size: int) -> int:
    """Evaluation keeps no activations for a backward pass: batches of about EVAL_INPUT_BYTES of input (at most
    4096 images), never fewer than twice the training batch."""
    return max(2 * train_batch, min(4096, EVAL_INPUT_BYTES // (4 * channels * image_size * image_size)))
