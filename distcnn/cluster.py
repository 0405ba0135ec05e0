"""The emulated cluster: several hosts on one machine, so the multi-node code path runs without a cluster.

A host is a network namespace `distcnn-hK` (K = 1..N) whose one interface, eth0, has the address 198.18.0.K/24
(198.18.0.0/15 is set aside for benchmarking, RFC 2544; it never leaves the machine). Two hosts are joined by
one veth pair; more by a bridge that lives in a namespace of its own, `distcnn-switch`. Every link and every
qdisc therefore lives inside a distcnn namespace, and deleting the namespaces removes all of it.

Caps are per direction, as on switched full-duplex Ethernet: a bandwidth cap is a `tbf` qdisc on the egress
of both ends of every link (a host's eth0 and, with a bridge, its switch port); a delay is a `netem` qdisc
above it on the hosts' eth0. The cluster's state is read back from the kernel, never from a file that could
disagree with it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from distcnn.config import parse_bandwidth, parse_delay
from distcnn.errors import UsageError

PREFIX = "distcnn-"
SWITCH = f"{PREFIX}switch"
BRIDGE = "br0"
INTERFACE = "eth0"
SUBNET = "198.18.0"
MAX_HOSTS = 250
NETNS_ETC = Path("/etc/netns")  # per-namespace files that `ip netns exec` mounts over /etc



@dataclass(frozen=True)
class Host:
    index: int  # 1..N

    @property
    def name(self) -> str:
        return f"{PREFIX}h{self.index}"

    @property
    def address(self) -> str:
        return f"{SUBNET}.{self.index}"

    @property
    def switch_port(self) -> str:
        return f"p{self.index}"


# ---- input ---------------------------------------------------------------------------------------------------

# ---- commands ------------------------------------------------------------------------------------------------

def require_privileges() -> None:
    """Namespaces and qdiscs need root and iproute2: say so in one line rather than fail halfway."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise UsageError(f"the emulated cluster needs iproute2 ({' and '.join(missing)} not found): "
                         "apt-get install -y iproute2")
    if os.geteuid() != 0:
        raise UsageError("the emulated cluster needs root (network namespaces and tc): run it as root, "
                         "e.g. sudo .venv/bin/distcnn cluster up")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if check and done.returncode != 0:
        problem = (done.stderr or done.stdout).strip().splitlines()
        raise UsageError(f"`{' '.join(argv)}` failed: {problem[-1] if problem else f'exit {done.returncode}'}")
    return done


def namespaces() -> list[str]:
    """The distcnn namespaces that exist now."""
    listed = _run("ip", "netns", "list", check=False).stdout.splitlines()
    return [line.split()[0] for line in listed if line.startswith(PREFIX)]


def hosts() -> list[Host]:
    """The emulated hosts that are up, in order."""
    found = []
    for name in namespaces():
        match = re.fullmatch(rf"{PREFIX}h(\d+)", name)
        if match:
            found.append(Host(int(match.group(1))))
    return sorted(found, key=lambda host: host.index)


def up(count: int, bandwidth: str | None = None, delay: str | None = None) -> list[Host]:
    """Bring up `count` hosts on a LAN (clearing what an earlier `up` left), with the caps given."""
    require_privileges()
    if not 2 <= count <= MAX_HOSTS:
        raise UsageError(f"--hosts must be between 2 and {MAX_HOSTS}, got {count}")
    rate, pause = _checked_caps(bandwidth, delay)
    down()
    members = [Host(index) for index in range(1, count + 1)]
    try:
        for host in members:
            _run("ip", "netns", "add", host.name)
            _run("ip", "-n", host.name, "link", "set", "lo", "up")
        if count == 2:
            first, second = members
            _run("ip", "link", "add", INTERFACE, "netns", first.name, "type", "veth",
                 "peer", "name", INTERFACE, "netns", second.name)
        else:
            _run("ip", "netns", "add", SWITCH)
            _run("ip", "-n", SWITCH, "link", "add", BRIDGE, "type", "bridge")
            _run("ip", "-n", SWITCH, "link", "set", BRIDGE, "up")
            for host in members:
                _run("ip", "link", "add", INTERFACE, "netns", host.name, "type", "veth",
                     "peer", "name", host.switch_port, "netns", SWITCH)
                _run("ip", "-n", SWITCH, "link", "set", host.switch_port, "master", BRIDGE)
                _run("ip", "-n", SWITCH, "link", "set", host.switch_port, "up")
        for host in members:
            _run("ip", "-n", host.name, "addr", "add", f"{host.address}/24", "dev", INTERFACE)
            _run("ip", "-n", host.name, "link", "set", INTERFACE, "up")
        _write_hosts_files(members)
        _apply_caps(members, rate, pause)
    except BaseException:
        down()  # nothing half-built stays behind
        raise
    return members


def down() -> list[str]:
    """Delete every distcnn namespace (their links and qdiscs go with them); returns what was removed."""
    removed = []
    for name in namespaces():
        _run("ip", "netns", "delete", name)
        removed.append(name)
    for folder in NETNS_ETC.glob(f"{PREFIX}*") if NETNS_ETC.is_dir() else []:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def _write_hosts_files(members: list[Host]) -> None:
    """/etc/netns/<host>/hosts, which `ip netns exec` mounts over /etc/hosts inside the host: the hosts know
    each other by name (torch's store otherwise waits on reverse lookups of the addresses and warns)."""
    try:
        base = Path("/etc/hosts").read_text()
    except OSError:
        base = "127.0.0.1 localhost\n"
    names = "".join(f"{host.address} {host.name}\n" for host in members)
    for host in members:
        folder = NETNS_ETC / host.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts").write_text(base.rstrip("\n") + "\n# distcnn emulated cluster\n" + names)


def ready_hosts(count: int) -> list[Host]:
    """The first `count` hosts of the cluster that is up, or one line saying how to bring it up."""
    require_privileges()
    present = hosts()
    if len(present) < count:
        now = f"{len(present)} host(s) are up" if present else "no emulated cluster is up"
        raise UsageError(f"--cluster emulated with --nnodes {count}: {now}; "
                         f"run `distcnn cluster up --hosts {count}` first")
    return present[:count]


def set_caps(members: list[Host], bandwidth: str | None, delay: str | None) -> None:
    """Replace the caps on the links of `members` (a study can sweep the bandwidth run by run)."""
    rate, pause = _checked_caps(bandwidth, delay)
    _apply_caps(members, rate, pause)


def _checked_caps(bandwidth: str | None, delay: str | None) -> tuple[float | None, str | None]:
    try:
        return parse_bandwidth(bandwidth), parse_delay(delay)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _tbf(rate_bits: float) -> list[str]:
    """tbf with a bucket of 4 ms at the rate (at least 64 KiB: a veth hands over whole 64 KiB GSO packets)."""
    burst = max(64 * 1024, int(rate_bits / 8 * 0.004))
    return ["tbf", "rate", f"{int(rate_bits)}bit", "burst", str(burst), "latency", "100ms"]


def _apply_caps(members: list[Host], rate: float | None, delay: str | None) -> None:
    ends = [(host.name, INTERFACE) for host in members]
    if SWITCH in namespaces():
        ends += [(SWITCH, host.switch_port) for host in members]
    for namespace, device in ends:
        _run("tc", "-n", namespace, "qdisc", "del", "dev", device, "root", check=False)
        on_host = namespace != SWITCH
        if delay is not None and on_host:
            done = _run("tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "handle", "1:",
                        "netem", "delay", delay, check=False)
            if done.returncode != 0:
                raise UsageError(f"--delay {delay}: this kernel has no netem qdisc ({done.stderr.strip()}); "
                                 "load it with `modprobe sch_netem`, or leave --delay out")
            if rate is not None:
                _run("tc", "-n", namespace, "qdisc", "add", "dev", device, "parent", "1:1", "handle", "10:",
                     *_tbf(rate))
        elif rate is not None:
            _run("tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "handle", "1:", *_tbf(rate))


# ---- what is up ------------------------------------------------------------------------------------------------

def caps(host: Host) -> str:
    """The host's eth0 caps as tc shows them ('none' when uncapped)."""
    shown = _run("tc", "-n", host.name, "qdisc", "show", "dev", INTERFACE, check=False).stdout
    kept = []
    for line in shown.splitlines():  # "qdisc tbf 1: root refcnt 3 rate 100Mbit burst 64Kb lat 100ms"
        words = line.split()
        if len(words) > 1 and words[1] in ("tbf", "netem"):
            anchor = words.index("root") + 1 if "root" in words else words.index("parent") + 2
            options = words[anchor:]
            if options[:1] == ["refcnt"]:
                options = options[2:]
            kept.append(" ".join([words[1], *options]))
    return "; ".join(kept) or "none"


def link_counters(host: Host) -> dict:
    """eth0's byte and packet counters inside the host, and its state."""
    shown = _run("ip", "-n", host.name, "-j", "-s", "link", "show", INTERFACE, check=False).stdout
    try:
        link = json.loads(shown)[0]
    except (ValueError, IndexError):
        return {"state": "missing"}
    stats = link.get("stats64", link.get("stats", {}))
    return {"state": link.get("operstate", "?"), "rx_bytes": stats["rx"]["bytes"], "tx_bytes": stats["tx"]["bytes"],
            "rx_packets": stats["rx"]["packets"], "tx_packets": stats["tx"]["packets"]}


def layout(members: list[Host]) -> dict:
    """The hosts' names, addresses and caps as the kernel has them: what a run on them records."""
    return {"hosts": [{"name": host.name, "address": host.address, "caps": caps(host)} for host in members],
            "switch": SWITCH in namespaces()}


def describe() -> dict:
    """The cluster as it is now, with each host's link counters: what `distcnn cluster status` prints."""
    present = hosts()
    described = layout(present)
    for entry, host in zip(described["hosts"], present):
        entry |= link_counters(host)
    return described


def start_in(host: Host, argv: list[str], env: dict, cores: list[int] | None = None) -> subprocess.Popen:
    """Start a process inside a host (`ip netns exec` and taskset exec it: the pid is the process's own), on
    `cores` only where given (it and every process and thread it starts)."""
    pinned = ["taskset", "--cpu-list", ",".join(map(str, cores))] if cores else []
    return subprocess.Popen(["ip", "netns", "exec", host.name, *pinned, *argv], env=env)
