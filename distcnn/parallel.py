"""Ranks: torchrun launch, the process group, threads per rank, and the few collectives the loop needs.

One code path for 1 and N ranks (as in nanoGPT): a worker reads what torchrun put in its environment
(RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE); without it, it is the single rank of a one-process run.
Launching is torchrun's own launcher (torch.distributed.run), with distcnn's worker module as its script.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from distcnn import ownership
from distcnn.config import TrainConfig, available_cores
from distcnn.errors import UsageError, WorkersFailed
from distcnn.record import HOST_ENV, host_name

LOOPBACK = "127.0.0.1"
# What a CPU rank holds before its model and data matter: the private memory (USS) of a rank of the smallest
# 2-rank run peaked at 0.48-0.49 GiB, an idle `import torch` process holds 0.42-0.49 GiB (torch 2.14, Linux).
# A lower bound: a real model and its data add to it.
RANK_MEMORY = 450 * 2**20


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


def check_ranks(config: TrainConfig) -> None:
    """More ranks than this machine can hold are refused before anything starts (64 CPU ranks on 2 cores ran
    into the OOM killer after minutes): more CPU ranks than cores, or more ranks than its free memory holds at
    RANK_MEMORY each. --oversubscribe starts them anyway."""
    if config.oversubscribe:
        return
    ranks, emulated = local_ranks(config), config.cluster == "emulated"

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


WORKER = "distcnn.worker"  # what every rank runs; the forecast's calibration runs its own collective benchmark


def torchrun_args(config: TrainConfig, run_dir: Path, local_addr: str | None = None,
                  rdzv_conf: str | None = None, worker: str = WORKER) -> list[str]:
    """The torchrun command line (without `torchrun`) that starts distcnn's worker on this machine.

    `local_addr`: the address the other nodes reach this one at (default: this machine's address on the way to
    the rendezvous endpoint; torchrun would publish the host name); `rdzv_conf`: torchrun's --rdzv-conf, e.g.
    is_host=1 for the node that serves the c10d store. One machine without an endpoint meets on loopback: the
    c10d rendezvous of --standalone, at 127.0.0.1 instead of localhost on every interface."""
    args = [f"--nproc-per-node={config.nproc_per_node}", f"--max-restarts={config.max_restarts}"]
    endpoint, backend = config.rdzv_endpoint, config.rdzv_backend
    if config.nnodes == 1 and not endpoint:
        endpoint, backend, local_addr = f"{LOOPBACK}:0", "c10d", local_addr or LOOPBACK
    local_addr = local_addr or route_address(endpoint.rsplit(":", 1)[0].strip("[]"), config.nnodes > 1)
    if local_addr:
        args.append(f"--local-addr={local_addr}")
    if rdzv_conf:
        args.append(f"--rdzv-conf={rdzv_conf}")
    args += [f"--nnodes={config.nnodes}", f"--rdzv-backend={backend}", f"--rdzv-endpoint={endpoint}",
             f"--rdzv-id={config.rdzv_id}"]
    if config.node_rank is not None:
        args.append(f"--node-rank={config.node_rank}")
    return args + ["--module", worker, str(run_dir)]


def launch(config: TrainConfig, run_dir: Path, local_addr: str | None = None, rdzv_conf: str | None = None,
           worker: str = WORKER) -> None:
    """Start the workers (module `worker`, given RUN_DIR) through torchrun's own launcher and wait for them."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    ownership.mark_parent()  # the ranks torchrun starts die with this process (not with whoever set it before)
    threads = config.threads_per_rank(config.nproc_per_node, gpu=device_type(config.device) == "cuda")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # torchrun would otherwise set 1 and warn
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    try:
        with own_addresses_only(one_machine=config.nnodes == 1):
            run(parse_args(torchrun_args(config, run_dir, local_addr, rdzv_conf, worker)))
    except ChildFailedError as error:
        raise workers_failed(error.failures, run_dir) from None


def workers_failed(failures: dict, run_dir: Path) -> WorkersFailed:
    """The rank that failed first, how, and how to go on. torchrun stamps a failure when it notices it (to the
    second) and lists the ranks it saw fail before those it then stopped (SIGTERM); of ranks seen failing at
    once, a signal (a kill, a crash) comes before an exit code (often a rank that lost its peer)."""
    order = list(failures.items())
    rank, first = order[min(range(len(order)), key=lambda i: (
        order[i][1].timestamp, order[i][1].exitcode == -signal.SIGTERM, order[i][1].exitcode >= 0, i))]

    def how(failure) -> str:
        if failure.exitcode >= 0:
            return f"exit code {failure.exitcode}"
        if failure.exitcode == -signal.SIGTERM and failure is not first:
            return "stopped by the launcher"
        return f"killed by {failure.signal_name()}"

    groups: dict[str, list[int]] = {}  # the other ranks by how they ended, a few named each
    for other, failure in sorted(failures.items()):
        if other != rank:
            groups.setdefault(how(failure), []).append(other)
    others = ", ".join(f"rank{'s' if len(group) > 1 else ''} {', '.join(map(str, group[:4]))}"
                       f"{f' and {len(group) - 4} more' if len(group) > 4 else ''} ({ended})"
                       for ended, group in groups.items())
    message = f"rank {rank} failed first ({how(first)})" + (f", then {others}" if others else "")
    if first.exitcode == 2:
        return WorkersFailed(2, f"{message}: the mistake it printed above")
    return WorkersFailed(first.exitcode, f"{message}; continue the run with "
                                           f"`distcnn train --out {run_dir} --resume`")


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolved(host: str, multi_node: bool) -> str | None:
    """`host` as this machine resolves it; None where unknown, or where several machines need a host *name*
    that resolves to loopback here (a hosts file mapping the name to 127.0.1.1): the others know it otherwise."""
    try:
        address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError, UnicodeError):
        return None
    return None if multi_node and is_loopback(address) and not is_loopback(host) else address


def route_address(host: str, multi_node: bool) -> str | None:
    """This machine's address on the way to `host`, where `host` reaches it (a UDP connect sends nothing);
    None where unknown: torchrun then publishes the host name."""
    address = resolved(host, multi_node)
    try:
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((address, 9))
            return probe.getsockname()[0]
    except (OSError, TypeError):  # TypeError: no address
        return None


@contextmanager
def own_addresses_only(one_machine: bool):
    """While torchrun runs in this process, nothing it starts listens beyond its own address: the TCPStore
    servers of its rendezvous (the c10d or static store at the endpoint, the shared store MASTER_ADDR names)
    bind their host's address, and the ranks of one machine talk over loopback (GLOO_/NCCL_SOCKET_IFNAME).

    The store is unauthenticated and carries pickled state, yet a TCPStore server ignores its host and binds
    every interface ("::", else "0.0.0.0": UvTcpServer::makeWithPort in torch/csrc/distributed/c10d/
    TCPStoreLibUvBackend.cpp; the legacy backend's listen passes no address either) unless handed a listening
    socket (master_listen_fd), which torchrun never does. Where the address is unknown, torch's choice stands."""
    import psutil
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, dynamic_rendezvous, static_tcp_rendezvous

    def store(host_name, port, world_size=None, is_master=False, timeout=None, **options):
        options |= {"timeout": timeout} if timeout is not None else {}
        address = resolved(host_name, not one_machine) if is_master and "master_listen_fd" not in options else None
        if address is None:
            return TCPStore(host_name, port, world_size, is_master, **options)
        try:
            server = socket.create_server((address, port), family=socket.AF_INET6 if ":" in address else
                                          socket.AF_INET)
        except OSError as error:  # a RuntimeError, as TCPStore's: the c10d rendezvous then joins as a client
            raise RuntimeError(f"the rendezvous store cannot listen on {address}:{port}: {error}") from error
        return TCPStore(host_name, server.getsockname()[1], world_size, True, master_listen_fd=server.detach(),
                        **options)

    lo = next((name for name, addresses in psutil.net_if_addrs().items()
               if any(address.address == LOOPBACK for address in addresses)), "lo")
    variables = {"GLOO_SOCKET_IFNAME": lo, "NCCL_SOCKET_IFNAME": lo} if one_machine else {}
    saved_variables = {name: os.environ.get(name) for name in variables}
    replacements = [(c10d_rendezvous_backend, "TCPStore", store), (static_tcp_rendezvous, "TCPStore", store),
                    (dynamic_rendezvous.DynamicRendezvousHandler, "_create_tcp_store_server",
                     lambda _, addr, port: store(addr, port, is_master=True, multi_tenant=True))]
    # a torch without one of these names keeps its own binding there (the sockets test would show it)
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements if hasattr(owner, name)]
    for owner, name, replacement in replacements:
        if hasattr(owner, name):
            setattr(owner, name, replacement)
    os.environ.update(variables)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        for name, value in saved_variables.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def launch_emulated(config: TrainConfig, run_dir: Path, worker: str = WORKER) -> None:
    """One torchrun node agent inside each emulated host, meeting at a c10d rendezvous on the first host's
    address: the real multi-node code path, over the emulated network."""
    import secrets
    import sys
    import time

    from distcnn import cluster
    from distcnn.record import write_json

    ownership.mark_parent()  # the node agents die with this process (not with whoever set it before)
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
                    "1" if i == 0 else "0", worker]
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
            working = any("distcnn." in " ".join(child.cmdline())
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
