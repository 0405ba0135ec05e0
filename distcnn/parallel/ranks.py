"""Where this process stands in the job. No torch.distributed here (nor torch at run time): the console, the
checkpoint and the telemetry name a rank without joining a process group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None: a single process without a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @classmethod
    def single(cls, device: torch.device, local_rank: int = 0) -> Ranks:
        """This process as a job of its own (rank 0 of 1, no process group): a local CNN trained without talking
        to the other ranks, weights read on the side. `local_rank` keeps its place on the machine for the
        resource sampler (the host's counters are read by local rank 0 only)."""
        return cls(0, local_rank, 1, 1, device, None)
