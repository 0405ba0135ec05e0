"""Checkpoints: written atomically by rank 0, read safely (weights_only) and shared with every rank."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from distcnn.parallel.ranks import Ranks
from distcnn.record import write_atomic


def save_checkpoint(path: Path, state: dict) -> None:
    write_atomic(path, lambda handle: torch.save(state, handle), binary=True)


def load_checkpoint(path: Path, ranks: Ranks | None = None) -> dict:
    """Rank 0 reads the file and sends it to the others, so machines without the file resume too."""
    state = None
    if ranks is None or ranks.is_main:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if ranks is not None and ranks.distributed:
        box = [state]
        dist.broadcast_object_list(box, src=0, device=ranks.device if ranks.device.type == "cuda" else None)
        state = box[0]
    return state
