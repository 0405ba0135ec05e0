"""The process group of one rank: its device and threads, joining and leaving torchrun's group, and the few
collectives the loop needs (each a no-op for a single process)."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from distcnn.config import TrainConfig
from distcnn.parallel.ranks import Ranks
from distcnn.record import host_name


def device_type(choice: str) -> str:
    """`cuda` or `cpu`: what --device (auto, cpu, cuda) means on this machine."""
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


def pick_device(choice: str, local_rank: int) -> torch.device:
    """One rank per GPU: local rank i trains on visible GPU i (check_gpus refuses more ranks than GPUs)."""
    if device_type(choice) == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# --collective-timeout's default: what a rank waits in a collective for the others before the first epoch ends
# (data decoded, the model compiled), then a multiple of the slowest epoch so far, with a floor (note_epoch)
FIRST_TIMEOUT = 600.0
EPOCH_MULTIPLE, TIMEOUT_FLOOR = 10.0, 120.0


def setup(config: TrainConfig) -> Ranks:
    """Join the process group torchrun prepared (if any), pin the device and the threads of this rank."""
    launched = "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    # the emulated hosts of a cluster share this machine's GPUs: their ranks, not local ranks, pick one
    device = pick_device(config.device, rank if config.cluster == "emulated" else local_rank)
    torch.set_num_threads(config.threads_per_rank(local_world_size, gpu=device.type == "cuda"))
    backend = None
    if launched:
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = attempt_store(world_size)
        options = {"store": store, "rank": rank, "world_size": world_size} if store is not None else {}
        options["timeout"] = timedelta(seconds=config.collective_timeout or FIRST_TIMEOUT)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group(backend, device_id=device, **options)
        else:
            dist.init_process_group(backend, **options)
        global _MEETING
        _MEETING = store if store is not None else dist.distributed_c10d._get_default_store()
        _MEETING.set(f"{PRESENT}{rank}", f"{host_name()} {os.getpid()}")  # who to name if it stops
    return Ranks(rank, local_rank, world_size, local_world_size, device, backend)


PRESENT, WAITED = "distcnn/rank/", "distcnn/waited/"  # store keys: each rank's host and pid; who timed out
_MEETING = None  # the store this rank's process group met in (torchrun's, or the one env:// made)


TIMEOUT_SIGNS = ("Timed out waiting",  # gloo, a receive that waited its whole timeout
                 "Application timeout caused pair closure",  # gloo, a pair whose operation timed out (a broadcast)
                 "Watchdog caught collective operation timeout")  # NCCL's watchdog


def is_timeout(error: BaseException) -> bool:
    """A collective that waited its whole timeout for a peer, as the backend words it (TIMEOUT_SIGNS)."""
    return any(sign in str(error) for sign in TIMEOUT_SIGNS)


def stopped_ranks(ranks: Ranks, grace: float = 1.0) -> dict[int, str]:
    """After this rank's collective timed out: the ranks that stopped making progress (those that did not time
    out too within `grace` seconds: they are not waiting, they are stuck), each as "host pid". A stopped rank on
    this machine is ended (SIGKILL), so that torchrun need not wait for it to answer SIGTERM."""
    store = _MEETING
    store.set(f"{WAITED}{ranks.rank}", "1")
    time.sleep(grace)
    stopped = {}
    for rank in range(ranks.world_size):
        if rank != ranks.rank and not store.check([f"{WAITED}{rank}"]):
            stopped[rank] = store.get(f"{PRESENT}{rank}").decode() if store.check([f"{PRESENT}{rank}"]) else "?"
    for where in stopped.values():
        host, _, pid = where.partition(" ")
        if host == host_name() and pid.isdigit():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
    return stopped


def note_epoch(config: TrainConfig, ranks: Ranks, slowest_epoch_seconds: float) -> None:
    """After an epoch: unless --collective-timeout is given, a collective waits for the others at most
    EPOCH_MULTIPLE x the slowest epoch so far, and at least TIMEOUT_FLOOR seconds."""
    if ranks.distributed and config.collective_timeout is None:
        dist.set_timeout(timedelta(seconds=max(TIMEOUT_FLOOR, EPOCH_MULTIPLE * slowest_epoch_seconds)))


def attempt_store(world_size: int):
    """torchrun's own store, seen through a prefix per restart: after a restart, the process group of the new
    workers must not read the addresses the killed workers left in the store (gloo then connects to a dead
    port). None outside torchrun's agent store: env:// as usual."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"distcnn/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def teardown(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], ranks: Ranks) -> list[float]:
    """Sum a few numbers over all ranks (float64 on the rank's device, as the backend wants)."""
    if not ranks.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=ranks.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(value: float, ranks: Ranks) -> float:
    if not ranks.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=ranks.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def broadcast_flag(value: bool, ranks: Ranks) -> bool:
    """Rank 0's answer for everyone: machines without a shared filesystem must decide alike."""
    if not ranks.distributed:
        return value
    tensor = torch.tensor([1 if value else 0], dtype=torch.int64, device=ranks.device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def gather(value, ranks: Ranks) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not ranks.distributed:
        return [value]
    values: list = [None] * ranks.world_size
    dist.all_gather_object(values, value)
    return values


def gather_hosts(ranks: Ranks) -> list[str]:
    """The host name of every rank, in rank order: a multi-node run records all its machines."""
    return gather(host_name(), ranks)


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()
