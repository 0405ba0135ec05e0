"""The launch of a run's ranks through torchrun's own launcher (torch.distributed.run), with distcnn's worker
module as its script, and the failures it reports as one line naming the rank that failed first."""

from __future__ import annotations

import logging
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from distcnn import ownership
from distcnn.config import TrainConfig
from distcnn.errors import FailedAfterTheRun, RunInterrupted, WorkersFailed
from distcnn.parallel.addresses import LOOPBACK, own_addresses_only, route_address, silent_listener
from distcnn.parallel.world import device_type
from distcnn.record import STALLED, RunRecord


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
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    ownership.mark_parent()  # the ranks torchrun starts die with this process (not with whoever set it before)
    threads = config.threads_per_rank(config.nproc_per_node, gpu=device_type(config.device) == "cuda")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # torchrun would otherwise set 1 and warn
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    stalled = Path(run_dir) / STALLED  # where a rank whose collective timed out names the rank that stopped
    stalled.unlink(missing_ok=True)
    if config.rdzv_endpoint:
        check_store(config, read_timeout(rdzv_conf))
    try:
        with own_addresses_only(one_machine=config.nnodes == 1), cheap_event_names():
            run(parse_args(torchrun_args(config, run_dir, local_addr, rdzv_conf, worker)))
        stalled.unlink(missing_ok=True)  # (a restart went on after it: the summary lists the restart)
    except RendezvousError as error:  # the endpoint never answered, or the other machines never joined
        raise rendezvous_failed(config, error) from None
    except ChildFailedError as error:
        if stalled.exists():
            line = stalled.read_text(encoding="utf-8").strip()
            stalled.unlink(missing_ok=True)
            raise WorkersFailed(1, line) from None
        if RunRecord(run_dir).finished:
            message, exitcode = who_failed(error.failures)
            raise FailedAfterTheRun(exitcode, f"{message} on its way out, after the run had finished; its record "
                                              f"is complete") from None
        raise workers_failed(error.failures, run_dir) from None


@contextmanager
def cheap_event_names():
    """torch's dynamic rendezvous names each event it logs after the method that logged it, found by building
    the whole stack with its source lines twice (inspect.stack): 0.6 s of CPU a launch on a 2-core machine, for
    a name. While torchrun runs here, the same name comes from the frame itself. A torch without that function
    keeps its own."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous

    def method_name(depth: int = 2) -> str:
        try:
            return sys._getframe(depth).f_code.co_name  # (frame 0: this function, as inspect.stack()[0] is)
        except ValueError:
            return "no_method_name"

    saved = getattr(dynamic_rendezvous, "get_method_name", None)
    if saved is not None:
        dynamic_rendezvous.get_method_name = method_name
    try:
        yield
    finally:
        if saved is not None:
            dynamic_rendezvous.get_method_name = saved


READ_TIMEOUT_S = 60.0  # torch's c10d rendezvous: how long a store client waits for its store


def read_timeout(rdzv_conf: str | None) -> float:
    """The rendezvous read timeout torchrun is given (--rdzv-conf read_timeout=S), else torch's default."""
    for item in (rdzv_conf or "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "read_timeout" and value.strip():
            return float(value)
    return READ_TIMEOUT_S


def check_store(config: TrainConfig, seconds: float) -> None:
    """Something at the endpoint that accepts connections but never answers as a store would leave the launch
    waiting without end (torch's store client has no timeout on its handshake): one line naming it, after the
    read timeout, before torchrun starts. Where it can be seen on this machine, launch.validate refused it."""
    host, _, port = config.rdzv_endpoint.rpartition(":")
    if silent_listener(host.strip("[]"), int(port), seconds):
        raise RunInterrupted(f"the rendezvous at {config.rdzv_endpoint} failed: something listens there but did "
                             f"not answer as a rendezvous store within {seconds:g} s (another program on that "
                             f"port?); choose a free port, or stop that program")


def rendezvous_failed(config: TrainConfig, error: Exception) -> RunInterrupted:
    """A rendezvous that did not happen, as one line naming the endpoint: its store could not be reached, or
    not every machine joined in time."""
    endpoint = config.rdzv_endpoint or "this machine's own endpoint"
    joined = type(error).__name__ == "RendezvousTimeoutError"
    why = (f"not all {config.nnodes} machines joined in time" if joined
           else "its store could not be reached (nothing answers there, or a firewall is in the way)")
    return RunInterrupted(f"the rendezvous at {endpoint} failed: {why}; start the same command on every machine, "
                          f"the one that has the endpoint's address first")


def workers_failed(failures: dict, run_dir: Path) -> WorkersFailed:
    """The rank that failed first, how, and how to go on."""
    message, exitcode = who_failed(failures)
    if exitcode == 2:
        return WorkersFailed(2, f"{message}: the mistake it printed above")
    return WorkersFailed(exitcode, f"{message}; continue the run with `distcnn train --out {run_dir} --resume`")


def who_failed(failures: dict) -> tuple[str, int]:
    """"rank R failed first (how), then ...", and its exit code. torchrun stamps a failure when it notices it
    (to the second) and lists the ranks it saw fail before those it then stopped (SIGTERM); of ranks seen
    failing at once, a signal (a kill, a crash) comes before an exit code (often a rank that lost its peer)."""
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
    return f"rank {rank} failed first ({how(first)})" + (f", then {others}" if others else ""), first.exitcode
