"""A run on the emulated cluster: one torchrun node agent inside each host's network namespace."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from distcnn import ownership
from distcnn.config import HOST_ENV, TrainConfig, share_of_cores
from distcnn.errors import WorkersFailed
from distcnn.parallel.torchrun import WORKER
from distcnn.record import RunRecord

AGENTS_SETTLE_S = 15.0  # once a node agent has ended well, how long the others get to end on their own
FAILED_SETTLE_S = 3.0  # once one has failed: the job has failed, the others only get to say why on their own


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
            # each host on cores of its own, as real hosts are: unpinned, one host's collective threads took
            # the core the other's backward computed on
            agents.append((host, cluster.start_in(host, argv, env, share_of_cores(i, len(members)))))
        # once an agent has ended, the others end within moments: they finished too (torchrun's exit barrier),
        # or cannot finish without it (it failed, or its ranks failed on their way out after the run): a moment
        # to stop on their own, as no agent waits 300 s in the exit barrier for one that will not come; a
        # shorter one once an agent failed, as nothing the others do can finish the job then
        deadline = None
        while True:
            codes = [agent.poll() for _, agent in agents]  # every agent, each time (not any()'s first alive)
            if None not in codes or (deadline is not None and time.monotonic() >= deadline):
                break
            if first_failure is None:
                first_failure = next(((host, code) for (host, _), code in zip(agents, codes)
                                      if code not in (None, 0)), None)
            if deadline is None and any(code is not None for code in codes):
                deadline = time.monotonic() + AGENTS_SETTLE_S
            if first_failure is not None:
                deadline = min(deadline, time.monotonic() + FAILED_SETTLE_S)
            time.sleep(0.2)
    finally:
        for _, agent in agents:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
        for _, agent in agents:
            stop_agent(agent)
    if first_failure is None and RunRecord(run_dir).finished:
        return  # the agents the loop stopped were waiting for the others at torchrun's exit barrier
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
