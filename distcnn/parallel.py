"""Ranks: torchrun launch, the process group, threads per rank, and the few collectives the loop needs.

One code path for 1 and N ranks (as in nanoGPT): a worker reads what torchrun put in its environment
(RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE); without it, it is the single rank of a one-process run.
Launching is torchrun's own launcher (torch.distributed.run), with distcnn's worker module as its script.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from distcnn.config import TrainConfig
from distcnn.errors import UsageError, WorkersFailed
from distcnn.record import HOST_ENV, host_name


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


def device_type(choice: str) -> str:
    """`cuda` or `cpu`: what --device (auto, cpu, cuda) means on this machine."""
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


def pick_device(choice: str, local_rank: int) -> torch.device:
    """One rank per GPU: local rank i trains on visible GPU i (check_gpus refuses more ranks than GPUs)."""
    if device_type(choice) == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def local_ranks(config: TrainConfig) -> int:
    """Ranks that share this machine: every emulated host's ranks run here too."""
    return config.nproc_per_node * (config.nnodes if config.cluster == "emulated" else 1)


def check_gpus(config: TrainConfig) -> None:
    """One rank per visible GPU: more ranks than GPUs on a machine is refused before anything starts (NCCL
    would end in "Duplicate GPU detected")."""
    if device_type(config.device) != "cuda":
        return
    ranks, gpus = local_ranks(config), torch.cuda.device_count()
    if ranks > gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise UsageError(f"{ranks} ranks on this machine but {gpus} GPU{'s' if gpus != 1 else ''} visible"
                         f"{shown}: distcnn runs one rank per GPU; use --nproc-per-node {gpus}"
                         f"{' with fewer emulated hosts' if config.cluster == 'emulated' else ''}, "
                         "or --device cpu")


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
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group(backend, device_id=device, **options)
        else:
            dist.init_process_group(backend, **options)
    return Ranks(rank, local_rank, world_size, local_world_size, device, backend)


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


def needs_torchrun(config: TrainConfig) -> bool:
    """A single-process run without restarts runs in this process; everything else goes through torchrun."""
    return config.nproc_per_node > 1 or config.nnodes > 1 or config.max_restarts > 0


def torchrun_args(config: TrainConfig, run_dir: Path, local_addr: str | None = None,
                  rdzv_conf: str | None = None) -> list[str]:
    """The torchrun command line (without `torchrun`) that starts distcnn's worker on this machine.

    `local_addr`: the address the other nodes reach this one at (torchrun otherwise publishes the host name);
    `rdzv_conf`: torchrun's --rdzv-conf, e.g. is_host=1 for the node that serves the c10d store."""
    args = [f"--nproc-per-node={config.nproc_per_node}", f"--max-restarts={config.max_restarts}"]
    if local_addr:
        args.append(f"--local-addr={local_addr}")
    if rdzv_conf:
        args.append(f"--rdzv-conf={rdzv_conf}")
    if config.nnodes == 1 and not config.rdzv_endpoint:
        args.append("--standalone")
    else:
        args += [
            f"--nnodes={config.nnodes}",
            f"--rdzv-backend={config.rdzv_backend}",
            f"--rdzv-endpoint={config.rdzv_endpoint}",
            f"--rdzv-id={config.rdzv_id}",
        ]
        if config.node_rank is not None:
            args.append(f"--node-rank={config.node_rank}")
    return args + ["--module", "distcnn.worker", str(run_dir)]


def launch(config: TrainConfig, run_dir: Path, local_addr: str | None = None, rdzv_conf: str | None = None) -> None:
    """Start the workers through torchrun's own launcher and wait for them."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    threads = config.threads_per_rank(config.nproc_per_node, gpu=device_type(config.device) == "cuda")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # torchrun would otherwise set 1 and warn
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    try:
        run(parse_args(torchrun_args(config, run_dir, local_addr, rdzv_conf)))
    except ChildFailedError as error:
        rank, failure = min(error.failures.items())
        raise WorkersFailed(failure.exitcode, f"rank {rank} failed with exit code {failure.exitcode}") from None


def launch_emulated(config: TrainConfig, run_dir: Path) -> None:
    """One torchrun node agent inside each emulated host, meeting at a c10d rendezvous on the first host's
    address: the real multi-node code path, over the emulated network."""
    import secrets
    import signal
    import sys
    import time

    from distcnn import cluster
    from distcnn.record import write_json

    members = cluster.ready_hosts(config.nnodes)
    if config.bandwidth is not None or config.delay is not None:
        cluster.set_caps(members, config.bandwidth, config.delay)
    write_json(run_dir / "cluster.json", cluster.layout(members))  # the network the run had
    endpoint = f"{members[0].address}:{20000 + secrets.randbelow(20000)}"
    rdzv_id = f"distcnn-{secrets.token_hex(4)}"
    agents, first_failure = [], None  # first_failure: (host, exit code) of the agent that failed first
    try:
        for i, host in enumerate(members):
            env = os.environ | {HOST_ENV: host.name, "GLOO_SOCKET_IFNAME": cluster.INTERFACE,
                                "NCCL_SOCKET_IFNAME": cluster.INTERFACE}
            argv = [sys.executable, "-m", "distcnn.node_agent", str(run_dir), host.address, endpoint, rdzv_id,
                    "1" if i == 0 else "0"]
            agents.append((host, cluster.start_in(host, argv, env)))
        deadline = None  # once an agent has failed, the others cannot finish: a moment to stop on their own
        while True:
            codes = [agent.poll() for _, agent in agents]  # every agent, each time (not any()'s first alive)
            if None not in codes or (deadline is not None and time.monotonic() >= deadline):
                break
            if first_failure is None:
                first_failure = next(((host, code) for (host, _), code in zip(agents, codes)
                                      if code not in (None, 0)), None)
                deadline = time.monotonic() + 15 if first_failure else None
            time.sleep(0.2)
    finally:
        for _, agent in agents:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
        for _, agent in agents:
            stop_agent(agent)
    failed = first_failure or next(((host, agent.returncode) for host, agent in agents if agent.returncode != 0),
                                   None)  # the agents the loop stopped, or one that failed as the last exited
    if failed:
        host, code = failed
        raise WorkersFailed(code, f"the node agent on {host.name} failed with exit code {code}")


def stop_agent(agent, grace: float = 30.0, idle_grace: float = 3.0) -> None:
    """Wait for a node agent that was sent SIGTERM, then kill it. An agent with workers gets `grace` seconds to
    stop them; one whose workers are gone has nothing left to clean up (it waits in torchrun's exit barrier for
    the agent that died, a wait no signal interrupts) and is killed after `idle_grace`."""
    import time

    import psutil

    deadline, idle_since = time.monotonic() + grace, None
    while agent.poll() is None and time.monotonic() < deadline:
        try:
            working = any("distcnn.worker" in " ".join(child.cmdline())
                          for child in psutil.Process(agent.pid).children(recursive=True))
        except psutil.Error:  # it exited while we looked
            working = False
        idle_since = None if working else (idle_since or time.monotonic())
        if idle_since is not None and time.monotonic() - idle_since >= idle_grace:
            break
        time.sleep(0.2)
    if agent.poll() is None:
        agent.kill()
    agent.wait()
