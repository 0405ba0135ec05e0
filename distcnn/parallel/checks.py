"""Before launch: more ranks than this machine can hold are refused in one line (GPUs, cores, memory)."""

from __future__ import annotations

import os

import torch

from distcnn.config import TrainConfig, available_cores
from distcnn.errors import UsageError
from distcnn.parallel.world import device_type

# What a CPU rank holds before its model and data matter: the private memory (USS) of a rank of the smallest
# 2-rank run peaked at 0.48-0.49 GiB, an idle `import torch` process holds 0.42-0.49 GiB (torch 2.14, Linux).
# A lower bound: a real model and its data add to it.
RANK_MEMORY = 450 * 2**20


def check_gpus(config: TrainConfig) -> None:
    """One rank per visible GPU: more ranks than GPUs on a machine is refused before anything starts (NCCL
    would end in "Duplicate GPU detected")."""
    if device_type(config.device) != "cuda":
        return
    ranks, gpus = config.ranks_on_machine(), torch.cuda.device_count()
    if ranks > gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise UsageError(f"{ranks} ranks on this machine but {gpus} GPU{'s' if gpus != 1 else ''} visible"
                         f"{shown}: distcnn runs one rank per GPU; use --nproc-per-node {gpus}"
                         f"{' with fewer emulated hosts' if config.cluster == 'emulated' else ''}, "
                         "or --device cpu")


def check_ranks(config: TrainConfig) -> None:
    """More ranks than this machine can hold are refused before anything starts (64 CPU ranks on 2 cores ran
    into the OOM killer after minutes): more CPU ranks than cores, or more ranks than its free memory holds at
    RANK_MEMORY each. --oversubscribe starts them anyway."""
    if config.oversubscribe:
        return
    ranks, emulated = config.ranks_on_machine(), config.cluster == "emulated"

    def way_out(limit: int) -> str:
        fewer = (f"at most {limit} ranks in all (hosts × --nproc-per-node)" if emulated
                 else f"--nproc-per-node {limit}")
        return f"use {fewer}, or --oversubscribe to start them anyway"

    cores = available_cores()
    if device_type(config.device) == "cpu" and ranks > cores:
        raise UsageError(f"{ranks} CPU ranks on this machine but {cores} core{'s' if cores != 1 else ''}: they "
                         f"would fight for cores and memory; {way_out(cores)}")
    import psutil

    available = psutil.virtual_memory().available
    if ranks * RANK_MEMORY > available:
        raise UsageError(f"{ranks} ranks need at least {ranks * RANK_MEMORY / 2**30:.1f} GiB (an estimate: "
                         f"{RANK_MEMORY / 2**30:.2f} GiB per rank before its model and data) but this machine has "
                         f"{available / 2**30:.1f} GiB available; {way_out(max(1, available // RANK_MEMORY))}")


def check_endpoint(config: TrainConfig) -> None:
    """An --rdzv-endpoint on this machine whose port another program listens on would leave the launch waiting
    without end (a store client never gets its answer): refused before launch, naming the program. An
    endpoint on another machine is that machine's to host; the rendezvous timeout names it if it never answers."""
    if not config.rdzv_endpoint or config.cluster == "emulated":
        return
    from distcnn.parallel.addresses import endpoint_holder

    host, _, port = config.rdzv_endpoint.rpartition(":")
    holder = endpoint_holder(host.strip("[]"), int(port))
    if holder is not None:
        raise UsageError(f"--rdzv-endpoint {config.rdzv_endpoint}: port {port} is already taken on this machine by "
                         f"{holder}, which is no rendezvous; choose a free port, or stop that program")
