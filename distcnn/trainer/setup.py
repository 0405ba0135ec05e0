"""What the loop (distcnn.trainer.loop) builds before its first step and the forecast's profile builds the same
way: the data, the optimiser and its schedule, DDP's wrapper, and each run record's environment.json."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distcnn.config import TrainConfig
from distcnn.data import DataSplits, load_data
from distcnn.parallel import world
from distcnn.parallel.ranks import Ranks
from distcnn.record import RunRecord, describe_environment
from distcnn.run_summary import speed_options

DATA_OPTIONS = ("data", "data_dir", "image_size", "train_subset", "val_fraction", "test_fraction", "split_seed",
                "download")


def load_splits(config: TrainConfig) -> DataSplits:
    data, *options = DATA_OPTIONS  # load_data's keywords carry the options' own names
    return load_data(getattr(config, data), **{name: getattr(config, name) for name in options})


def write_environment(config: TrainConfig, record: RunRecord, ranks: Ranks) -> None:
    """The one writer of environment.json (collective: every rank calls it; rank 0 writes): the ranks, their
    hosts, threads, device, backend and speed options of a run record."""
    hosts = world.gather_hosts(ranks)
    if ranks.is_main:
        record.write_environment(describe_environment(
            ranks.world_size, ranks.local_world_size, torch.get_num_threads(), str(ranks.device),
            ranks.backend or "none") | {"hosts": hosts} | speed_options(config, ranks.device.type))


def build_optimizer(model: nn.Module, config: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no decay on biases and norm scales
    groups = [{"params": decay, "weight_decay": config.resolved_weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # On a GPU the fused update is one kernel for all parameters, and with fp16 it reads the scaler's
    # overflow flag on the device (no host sync per step); on the CPU the default (foreach) update.
    fused = {"fused": True} if device_type == "cuda" else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.resolved_lr, momentum=config.momentum,
                               nesterov=config.momentum > 0, **fused)
    return torch.optim.AdamW(groups, lr=config.resolved_lr, **fused)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(1, config.epochs * steps_per_epoch)
    if config.schedule == "onecycle" and total >= 3:
        # a warm-up of at least two steps: torch's OneCycleLR divides by zero when it would last one (4 steps)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.resolved_lr, total_steps=total,
                                                   pct_start=max(0.25, 2 / total))
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)


def data_parallel(model: nn.Module, config: TrainConfig, ranks: Ranks) -> DistributedDataParallel:
    """The model wrapped in DDP, one device per rank. --bucket-cap-mb is passed only when given: DDP's own
    default is not "25" but 25 MB with a smaller 1 MB first bucket, which an explicit size would replace."""
    ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    buckets = {} if config.bucket_cap_mb is None else {"bucket_cap_mb": config.bucket_cap_mb}
    return DistributedDataParallel(model, device_ids=ids, **buckets)
