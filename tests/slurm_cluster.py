"""A real Slurm cluster for the tests (conftest's fixtures `slurm_cluster`, one node, and `two_node_slurm`, two
nodes on the emulated cluster's hosts), and its `sacct` stand-in.

The cluster: slurmctld and slurmd (Debian's Slurm 22.05, installed by `make` through scripts/ensure-slurm.sh)
and munged, started as children of the test process from a slurm.conf written into a temporary folder. The
node is this host (`hostname -s`) with its CPUs (2 here), partition `debug`; the daemons listen on free ports
picked at start, and keep their state, spool, logs and pid files in the temporary folder, so they never meet
a system Slurm. Plugins: auth/munge (munged on its own key and socket in that folder), proctrack/linuxproc,
task/none, select/cons_tres with CR_CPU (two 1-CPU jobs run side by side). SlurmUser is root, so the
fixture needs root; it skips with the reason when not root, when a binary is missing, or when the node is
not `idle` within START_TIMEOUT_S (the daemons' log tails are in the reason). At the end it cancels the
cluster's jobs and stops its daemons and any process left over from them, by pid. Made fast for tests:
batch jobs are scheduled on the controller's 1 s tick (batch_sched_delay=0), and KillWait=1, since a
submitit job ignores SIGTERM and only dies at the SIGKILL that follows KillWait (30 s by default).

Two nodes (`start_cluster(root, hosts=[...])`, the emulated cluster's hosts, distcnn/cluster.py): one slurmd in
each host's network namespace, under its own node name (the host's, e.g. distcnn-h1) and address, and the
slurmctld in the first host's namespace, as on a head node that is also a compute node. munged stays in this
namespace (its socket is a file, which every namespace reaches). The client commands (sbatch, squeue, srun ...)
are run on the first host, as from a login node: `env`'s PATH puts wrappers first that exec them there (inside a
host they run as they are). A job's tasks run inside their node's namespace, so each rank's network counters
are its host's. `kill_node` ends every process in one host's namespace (its slurmd, the job's step and ranks):
the node dies as a machine does; `start_node` starts its slurmd again (ReturnToService=2 brings it back).
`python tests/slurm_cluster.py up [--nodes 2] DIR` (what `make slurm-cluster` runs) starts one for a person to
try; it runs on until `python tests/slurm_cluster.py down DIR` (`make slurm-cluster-down`) stops it.

The `sacct` stand-in (a TEST STAND-IN FOR SLURMDBD): without an accounting database, the real `sacct`
fails; submitit then reads every job as UNKNOWN and waits forever for a job that died without writing its
result. So the fixture puts its own `sacct` first on the PATH of `SlurmCluster.env`. It answers from the
controller's memory (`squeue --states=all`, which still lists finished jobs for MinJobAge = 1 h) in sacct's
format: `-o/--format` with the columns below, `-P/--parsable2`, `-p/--parsable`, `-n/--noheader`,
`-j/--jobs` (repeatable, comma lists), `-X` (ignored: steps are never listed). Array tasks come out as
`<id>_<task>`, a pending array rest as `<id>_[2-3]`, like sacct. States are the controller's JobState as
`scontrol show job` prints it (PENDING, RUNNING, COMPLETED, CANCELLED, FAILED, TIMEOUT, NODE_FAIL,
OUT_OF_MEMORY, PREEMPTED, ...): the state a job ended in, as accounting records it, never the COMPLETING
that squeue shows while a dead node's part of the job is still being cleaned up (sacct has no such state);
unlike sacct, a cancelled job reads `CANCELLED`, not `CANCELLED by <uid>` (compare the first word). A job
the controller does not know prints no line, as sacct does. On a real cluster, sacct answers itself.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 15.0
# how soon the controller declares a node that stopped answering DOWN (and fails its jobs, NODE_FAIL)
SLURMD_TIMEOUT_S = 2
PREFIX = "distcnn-"  # the emulated cluster's namespaces (distcnn/cluster.py)
PARTITION = "debug"
DAEMONS = ("slurmctld", "slurmd", "munged", "mungekey")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
# sacct column -> squeue --Format field (squeue -O), for the stand-in; ExitCode comes from scontrol, and so
# does State where scontrol knows the job (squeue reads COMPLETING while a job's failed node is cleaned up)
SACCT_COLUMNS = {
    "jobid": "JobArrayID", "jobidraw": "JobID", "jobname": "Name", "state": "State", "nodelist": "NodeList",
    "partition": "Partition", "exitcode": None, "start": "StartTime", "end": "EndTime",
    "elapsed": "TimeUsed", "submit": "SubmitTime", "user": "UserName", "alloccpus": "NumCPUs",
    "nnodes": "NumNodes", "reason": "Reason", "workdir": "WorkDir",
}


class ClusterUnavailable(RuntimeError):
    """The cluster cannot run here; the message says why (the fixture skips with it)."""


@dataclass
class SlurmCluster:
    """A running cluster. Merge `env` into the environment of whatever calls sbatch, squeue, sacct, scancel
    (for submitit: monkeypatch.setenv each key, since it calls them with os.environ)."""

    root: Path  # the temporary folder: slurm.conf, logs, state, spool, munge, bin/ (sacct, client wrappers)
    conf_path: Path
    node: str  # the first node
    cpus: int  # per node
    partition: str = PARTITION
    nodes: list[str] = field(default_factory=list)
    namespaces: dict[str, str] = field(default_factory=dict)  # node -> its host's network namespace (two-node)
    env: dict[str, str] = field(default_factory=dict)  # SLURM_CONF, PATH (bin/ first)
    pids: dict[str, int] = field(default_factory=dict)  # daemon name (slurmd: slurmd@NODE) -> pid
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)
    _spawn: Any = field(default=None, repr=False)

    def run(self, *args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Slurm client command (`scontrol`, `squeue` ...) against this cluster; text output."""
        return subprocess.run(list(args), env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def node_state(self, node: str | None = None) -> str:
        """The node's state as sinfo prints it ("idle", "mixed", "down*" ...), the first node's by default."""
        result = self.run("sinfo", "--noheader", "--Node", "--format=%T", "--nodes", node or self.node,
                          check=False)
        return result.stdout.strip().lower()

    def job_state(self, job_id: str) -> str:
        """The job's state as the sacct stand-in (and submitit) reads it; "" when unknown."""
        out = self.run("sacct", "-n", "-P", "-o", "JobID,State", "-j", str(job_id)).stdout
        states = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
        return states.get(str(job_id), "")

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for name in ("slurmctld", *(f"slurmd.{node}" for node in self.nodes), "munged"):
            log = self.root / f"{name}.log"
            text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else ["(no log)"]
            parts.append(f"--- {name}.log\n" + "\n".join(text))
        return "\n".join(parts)

    def kill_node(self, node: str) -> list[int]:
        """The node dies as a machine does: SIGKILL to every process in its host's network namespace (its
        slurmd, a job's slurmstepd and tasks, their ranks). Two-node clusters only; the pids killed."""
        inode = os.stat(f"/run/netns/{self.namespaces[node]}").st_ino
        killed = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and os.stat(entry / "ns" / "net").st_ino == inode:
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed.append(int(entry.name))
            except (OSError, ProcessLookupError):
                continue
        proc = self._proc(f"slurmd@{node}")
        if proc is not None:
            proc.wait(timeout=10)
        return killed

    def start_node(self, node: str) -> None:
        """Start the node's slurmd again (after kill_node); the controller returns it to service."""
        self._spawn(f"slurmd@{node}", "-D", "-f", str(self.conf_path), "-N", node)

    def stop(self) -> None:
        """Cancel every job, stop the daemons, then end whatever the cluster started that is still running
        (slurmstepd, job tasks: any process whose environment names this slurm.conf), all by pid."""
        if self.pids.get("slurmctld") and self._alive("slurmctld"):
            self.run("scancel", "--partition", self.partition, check=False, timeout=10)
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                out = self.run("squeue", "--noheader", "--format=%i", check=False, timeout=10).stdout
                if not out.strip():
                    break
                time.sleep(0.3)
        for name in [*(f"slurmd@{node}" for node in self.nodes), "slurmctld", "munged"]:
            proc = self._proc(name)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=8)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        for pid in _pids_with_env(f"SLURM_CONF={self.conf_path}"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _proc(self, name: str) -> subprocess.Popen | None:
        return next((p for p in reversed(self._procs) if p.pid == self.pids.get(name)), None)

    def _alive(self, name: str) -> bool:
        proc = self._proc(name)
        return proc is not None and proc.poll() is None


def _pids_with_env(marker: str) -> list[int]:
    """Processes (not this one nor its ancestors) whose initial environment holds `marker`."""
    spare = {os.getpid()}
    pid = os.getpid()
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        spare.add(pid)
    found, needle = [], marker.encode() + b"\0"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spare:
            continue
        try:
            if needle in (entry / "environ").read_bytes() + b"\0":
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 2048


def _write_conf(root: Path, nodes: dict[str, str], cpus: int, socket_path: Path) -> Path:
    """slurm.conf for `nodes` (name -> address; the first also runs the controller)."""
    ctld_port, slurmd_port = _free_ports(2)
    for sub in ("state", "spool"):
        (root / sub).mkdir(exist_ok=True)
    (root / "plugstack.conf").write_text("")  # none of the system's SPANK plugins
    head, address = next(iter(nodes.items()))
    for name in nodes:
        (root / "spool" / name).mkdir(exist_ok=True)
    controller = head if address == "127.0.0.1" else f"{head}({address})"  # slurmctld runs on the first node
    memory = max(256, _memory_mb() // (2 * len(nodes)))
    node_lines = "".join(f"NodeName={name} NodeAddr={addr} CPUs={cpus} RealMemory={memory} State=UNKNOWN\n"
                         for name, addr in nodes.items())
    conf = root / "slurm.conf"
    conf.write_text(f"""# {len(nodes)}-node test cluster (tests/slurm_cluster.py)
ClusterName=distcnn-test
SlurmctldHost={controller}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,batch_sched_delay=0,sched_min_interval=0
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout={SLURMD_TIMEOUT_S}
MessageTimeout=3
MinJobAge=3600
KillWait=1
InactiveLimit=0
{node_lines}PartitionName={PARTITION} Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _write_bin(root: Path, paths: dict[str, str], head_namespace: str | None) -> Path:
    """bin/: the sacct stand-in and, for a cluster on namespaces, the client commands run on the first host."""
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "sacct"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" sacct "$@"\n')
    script.chmod(0o755)
    for name in CLIENTS if head_namespace else ():
        wrapper = bin_dir / name
        wrapper.write_text(f'#!/bin/sh\n# run on the head host, as from a login node (tests/slurm_cluster.py)\n'
                           f'case "$(ip netns identify 2>/dev/null)" in {PREFIX}*) exec "{paths[name]}" "$@";; '
                           f'esac\nexec ip netns exec {head_namespace} "{paths[name]}" "$@"\n')
        wrapper.chmod(0o755)
    return bin_dir


def _in_host(namespace: str) -> list[str]:
    """The argv prefix that runs a daemon inside an emulated host, as a machine of its own: its network
    namespace, its hosts file (as `ip netns exec` mounts it) and its own host name (the node's: torchrun's c10d
    rendezvous finds the node that serves its store by it, as on a real cluster). This machine's /sys is kept:
    slurmd needs its cgroup mounts, which `ip netns exec` hides under a fresh sysfs. Every step execs: the pid is
    the daemon's."""
    return ["unshare", "--mount", "--uts", "--propagation", "slave", "nsenter", f"--net=/run/netns/{namespace}",
            "sh", "-c", 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"',
            f"/etc/netns/{namespace}/hosts", namespace]


def start_cluster(root: Path, hosts: list | None = None, timeout: float = START_TIMEOUT_S) -> SlurmCluster:
    """Start munged, slurmctld and slurmd(s) from files under `root` and wait for every node to be idle: one
    node, this host, or one per emulated host in `hosts` (distcnn.cluster.Host, which must be up).
    Raises ClusterUnavailable (daemons stopped) when the cluster cannot run here."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("the test Slurm cluster runs its daemons as root (SlurmUser=root); "
                                 "run the tests as root")
    paths = {name: shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") for name in
             DAEMONS + CLIENTS + (("ip", "unshare", "nsenter") if hosts else ())}
    missing = sorted(name for name, path in paths.items() if not path)
    if missing:
        raise ClusterUnavailable(f"Slurm is not installed (missing {', '.join(missing)}); "
                                 "run `make slurm` as root (apt-get install slurmctld slurmd slurm-client munge)")
    root = Path(root).resolve()
    cpus = len(os.sched_getaffinity(0))
    if hosts:
        nodes, cpus = {host.name: host.address for host in hosts}, max(1, cpus // len(hosts))
        namespaces = {host.name: host.name for host in hosts}
    else:
        nodes, namespaces = {socket.gethostname().split(".")[0]: "127.0.0.1"}, {}
    munge_dir = root / "munge"
    if len(str(munge_dir)) > 80:  # unix socket paths are short
        import tempfile
        munge_dir = Path(tempfile.mkdtemp(prefix="munge-"))
    munge_dir.mkdir(mode=0o700, exist_ok=True)
    socket_path = munge_dir / "munge.socket"
    conf = _write_conf(root, nodes, cpus, socket_path)
    head = next(iter(nodes))
    bin_dir = _write_bin(root, paths, namespaces.get(head))
    env = {"SLURM_CONF": str(conf), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    cluster = SlurmCluster(root=root, conf_path=conf, node=head, cpus=cpus, nodes=list(nodes),
                           namespaces=namespaces, env=env)
    daemon_env = {**os.environ, **env}

    def spawn(name: str, *args: str) -> None:
        program, _, node = name.partition("@")
        # munged stays here: its socket is a file, which every host reaches
        here = not namespaces or program == "munged"
        inside = [] if here else _in_host(namespaces[node or head])
        log = open(root / f"{name}.out", "ab")
        proc = subprocess.Popen([*inside, paths[program], *args], env=daemon_env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        cluster._procs.append(proc)
        cluster.pids[name] = proc.pid

    cluster._spawn = spawn
    try:
        key = munge_dir / "munge.key"
        subprocess.run([paths["mungekey"], "--create", "--keyfile", str(key)], check=True,
                       capture_output=True, timeout=10)
        spawn("munged", "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
              f"--log-file={root / 'munged.log'}", f"--pid-file={munge_dir / 'munged.pid'}",
              f"--seed-file={munge_dir / 'munged.seed'}")
        if not _wait(lambda: socket_path.exists() or _daemons_dead(cluster), 5) or _daemons_dead(cluster):
            raise ClusterUnavailable("munged did not start")
        spawn("slurmctld", "-D", "-c", "-i", "-f", str(conf))
        for node in nodes:
            cluster.start_node(node)
        if not _wait(lambda: _daemons_dead(cluster) or all(cluster.node_state(n) == "idle" for n in nodes),
                     timeout):
            raise ClusterUnavailable(f"the Slurm nodes did not reach idle within {timeout:.0f} s (states "
                                     f"{[cluster.node_state(n) for n in nodes]})")
        if _daemons_dead(cluster):
            raise ClusterUnavailable(f"a Slurm daemon exited at start ({_daemons_dead(cluster)})")
    except (ClusterUnavailable, OSError, subprocess.SubprocessError) as error:
        tails = cluster.log_tails()
        cluster.stop()
        raise ClusterUnavailable(f"{error}\n{tails}") from error
    return cluster


def _daemons_dead(cluster: SlurmCluster) -> str:
    return ", ".join(n for n in cluster.pids if not cluster._alive(n))


def _wait(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def sacct(argv: list[str]) -> int:
    """The stand-in: answer a sacct query from squeue (see the module docstring)."""
    columns, jobs, header, trailing = ["JobID", "JobName", "Partition", "State", "ExitCode"], [], True, False
    args = iter(argv)
    for arg in args:
        name, _, value = arg.partition("=")
        if name in ("-o", "--format"):
            columns = [c for c in (value or next(args, "")).split(",") if c]
        elif name in ("-j", "--jobs"):
            jobs += [j for j in (value or next(args, "")).split(",") if j]
        elif name.startswith("-j") and len(name) > 2:
            jobs += [j for j in name[2:].split(",") if j]
        elif name in ("-P", "--parsable2"):
            trailing = False
        elif name in ("-p", "--parsable"):
            trailing = True
        elif name in ("-n", "--noheader"):
            header = False
    unknown = [c for c in columns if c.split("%")[0].lower() not in SACCT_COLUMNS]
    if unknown:
        print(f"sacct (test stand-in): unsupported column(s) {', '.join(unknown)}", file=sys.stderr)
        return 1
    fields = [SACCT_COLUMNS[c.split("%")[0].lower()] for c in columns]
    rows: list[list[str]] = []
    # one query per job: squeue fails on the whole list when one id is unknown
    for job in dict.fromkeys(j.split("_")[0].split(".")[0] for j in jobs) if jobs else [None]:
        select = ["--jobs", job] if job else []
        exit_codes, states = {}, {}
        if None in fields or "State" in fields:  # scontrol lists every array task of the job
            out = subprocess.run(["scontrol", "show", "job", "-o", *(select[1:])], capture_output=True,
                                 text=True).stdout
            exit_codes = dict(re.findall(r"^JobId=(\d+) .*?\bExitCode=(\S+)", out, re.M))
            states = dict(re.findall(r"^JobId=(\d+) .*?\bJobState=(\S+)", out, re.M))
        # the raw job id rides last, to look up the exit code and state
        spec = ",".join(f"{f or 'JobID'}:|" for f in fields) + ",JobID:|"
        result = subprocess.run(["squeue", "--noheader", "--states=all", "-O", spec, *select],
                                capture_output=True, text=True)
        for line in result.stdout.splitlines() if result.returncode == 0 else []:
            values = [v.strip() for v in line.split("|")][: len(fields) + 1]
            raw_id = values.pop()
            values = [exit_codes.get(raw_id, "") if f is None else states.get(raw_id, v) if f == "State" else v
                      for f, v in zip(fields, values)]
            if values not in rows:
                rows.append(values)
    end = "|" if trailing else ""
    if header:
        print("|".join(columns) + end)
    for values in rows:
        print("|".join(values) + end)
    return 0


def up(root: Path, nodes: int) -> SlurmCluster:
    """Start a cluster for a person to try (`make slurm-cluster`), on `nodes` emulated hosts when more than one;
    it runs on after this process ends, its daemons' pids kept in ROOT/cluster.json for `down`."""
    import json

    from distcnn import cluster as emulated

    root.mkdir(parents=True, exist_ok=True)
    if (root / "cluster.json").exists():
        raise ClusterUnavailable(f"{root} already holds a cluster; stop it first: python {__file__} down {root}")
    hosts = emulated.up(nodes) if nodes > 1 else None
    try:
        slurm = start_cluster(root, hosts=hosts)
    except ClusterUnavailable:
        if hosts:
            emulated.down()
        raise
    (root / "cluster.json").write_text(json.dumps({"pids": slurm.pids, "env": slurm.env, "hosts": bool(hosts)}))
    return slurm


def down(root: Path) -> None:
    """Stop a cluster `up` started: cancel its jobs, end its daemons and what they left, take its hosts down."""
    import json

    from distcnn import cluster as emulated

    try:
        kept = json.loads((root / "cluster.json").read_text())
    except (OSError, ValueError) as error:
        raise ClusterUnavailable(f"no cluster to stop in {root} ({error})") from None
    env = {**os.environ, **kept["env"]}
    subprocess.run(["scancel", "--partition", PARTITION], env=env, capture_output=True, timeout=10)
    for pid in [*kept["pids"].values(), *_pids_with_env(f"SLURM_CONF={kept['env']['SLURM_CONF']}")]:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        if not _wait(lambda: _gone(pid), 8):
            os.kill(pid, signal.SIGKILL)
    if kept["hosts"]:
        emulated.down()
    (root / "cluster.json").unlink()


def _gone(pid: int) -> bool:
    """The process ended (a zombie no parent has reaped yet counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def main(argv: list[str]) -> int:
    if argv[:1] == ["sacct"]:
        return sacct(argv[1:])
    import argparse

    parser = argparse.ArgumentParser(prog="slurm_cluster.py", description="A test Slurm cluster on this machine.")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("root", type=Path, help="its folder: slurm.conf, logs, state")
    parser.add_argument("--nodes", type=int, default=1, choices=[1, 2], help="2: one slurmd per emulated host")
    args = parser.parse_args(argv)
    from distcnn.errors import UsageError

    try:
        if args.action == "down":
            down(args.root.resolve())
            print(f"Slurm cluster in {args.root} stopped")
            return 0
        slurm = up(args.root.resolve(), args.nodes)
    except (ClusterUnavailable, UsageError) as error:
        print(f"slurm_cluster.py: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"Slurm cluster up: nodes {', '.join(slurm.nodes)}, partition {slurm.partition}. To use it:")
    print(f"  export SLURM_CONF={slurm.env['SLURM_CONF']} PATH={slurm.root / 'bin'}:$PATH")
    print(f"Stop it: python {__file__} down {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
