"""Where the resource figures come from: psutil (process, system, network), NVML (GPU), RAPL (CPU energy).

Each source reads raw counters and says None for a counter this machine does not have — the sampler turns
differences of counters into rates and never invents a value.
"""

from __future__ import annotations

import ipaddress
import os
import resource
import socket
import sys
from pathlib import Path

import psutil

POWERCAP = Path("/sys/class/powercap")
def rss_peak_bytes() -> int:
    """The process's peak resident set size, as the kernel kept it (exact, unlike any sampled maximum)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def network_counters() -> dict[str, tuple[int, int, int, int]]:
    """Per interface: (bytes received, bytes sent, packets received, packets sent) since boot."""
    counters = psutil.net_io_counters(pernic=True)
    return {name: (c.bytes_recv, c.bytes_sent, c.packets_recv, c.packets_sent) for name, c in counters.items()}


def _local_addresses() -> dict[str, str]:
    """Address -> interface, for every address of this machine (this network namespace)."""
    found = {}
    for interface, addresses in psutil.net_if_addrs().items():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                found[address.address.split("%")[0]] = interface
    return found


def _loopback_interfaces() -> list[str]:
    return [name for name, addrs in psutil.net_if_addrs().items()
            if any(a.family in (socket.AF_INET, socket.AF_INET6) and ipaddress.ip_address(a.address.split("%")[0])
                   .is_loopback for a in addrs)] or ["lo"]


def run_interfaces(master_addr: str | None, local_world_size: int, world_size: int) -> list[str]:
    """The interfaces that carry this job's traffic on this host.

    Ranks on the same host talk over loopback (the kernel routes even this host's own external address
    through it); ranks on other hosts over the interface that routes to the rendezvous master. A job of
    one process has no traffic of its own: then the host's external interfaces, what a system monitor shows."""
    if world_size <= 1:
        loopback = set(_loopback_interfaces())
        up = {name for name, stats in psutil.net_if_stats().items() if stats.isup}
        return sorted(name for name in network_counters() if name in up and name not in loopback)
    chosen = set(_loopback_interfaces()) if local_world_size > 1 else set()
    if world_size > local_world_size and master_addr:
        chosen.add(_interface_towards(master_addr))
    return sorted(chosen)


def _interface_towards(host: str) -> str:
    """The interface this machine uses to reach `host`. When `host` is this machine's own address, the
    interface that holds it: the other hosts reach the master through it (loopback for a loopback address)."""
    locals_ = _local_addresses()
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_UDP)
        family, _, _, _, address = infos[0]
        target = address[0]
        if ipaddress.ip_address(target).is_loopback:
            return _loopback_interfaces()[0]
        if target in locals_:
            return locals_[target]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:  # no packet is sent: connect only routes
            probe.connect((target, 9))
            source = probe.getsockname()[0]
        return locals_.get(source, "unknown")
    except (OSError, ValueError):
        return "unknown"


class Rapl:
    """CPU package energy from /sys/class/powercap (Intel, and AMD on recent kernels); wrap-around handled."""

    def __init__(self):
        self.zones = []
        for zone in sorted(POWERCAP.glob("intel-rapl:*")) if POWERCAP.is_dir() else []:
            if zone.name.count(":") != 1:  # package level only: sub-zones (core, dram) are inside it
                continue
            try:
                int((zone / "energy_uj").read_text())
                limit = int((zone / "max_energy_range_uj").read_text())
            except (OSError, ValueError):  # unreadable (root only on most kernels since 2020)
                continue
            self.zones.append((zone / "energy_uj", limit))
        self.names = [f"rapl:{path.parent.name}" for path, _ in self.zones]
        self.last = [self._read(path) for path, _ in self.zones]

    @property
    def available(self) -> bool:
        return bool(self.zones)

    @staticmethod
    def _read(path: Path) -> int:
        return int(path.read_text())

    def joules_since_last(self) -> float | None:
        if not self.zones:
            return None
        total = 0
        for i, (path, limit) in enumerate(self.zones):
            now = self._read(path)
            total += (now - self.last[i]) % (limit + 1) if now < self.last[i] else now - self.last[i]
            self.last[i] = now
        return total / 1e6


class Nvml:
    """One GPU through NVML: utilisation, memory, power and the energy counter (None where unsupported)."""

    def __init__(self, cuda_index: int | None):
        self.handle = None
        self.name = None
        if cuda_index is None:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = self._handle(cuda_index)
            self.name = f"nvml:gpu{cuda_index}"
            self.energy_start = self._energy_millijoules()
        except Exception:  # no driver, no library, no permission: the GPU columns stay empty
            self.handle = None

    def _handle(self, cuda_index: int):
        """The NVML device of torch's cuda:i, by UUID (CUDA_VISIBLE_DEVICES may renumber devices)."""
        import torch

        try:
            uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
            return self.nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        except Exception:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            ids = [v for v in visible.split(",") if v.strip()]
            physical = int(ids[cuda_index]) if cuda_index < len(ids) and ids[cuda_index].isdigit() else cuda_index
            return self.nvml.nvmlDeviceGetHandleByIndex(physical)

    @property
    def available(self) -> bool:
        return self.handle is not None

    def _try(self, read):
        try:
            return read()
        except Exception:
            return None

    def _energy_millijoules(self) -> int | None:
        return self._try(lambda: self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def read(self) -> dict:
        if self.handle is None:
            return {}
        nvml, h = self.nvml, self.handle
        energy = self._energy_millijoules()
        power = self._try(lambda: nvml.nvmlDeviceGetPowerUsage(h))
        memory = self._try(lambda: nvml.nvmlDeviceGetMemoryInfo(h).used)
        return {
            "gpu_util_percent": self._try(lambda: nvml.nvmlDeviceGetUtilizationRates(h).gpu),
            "gpu_memory_used_bytes": memory,
            "gpu_power_watts": power / 1000 if power is not None else None,
            "gpu_energy_joules": (energy - self.energy_start) / 1000
            if energy is not None and self.energy_start is not None else None,
        }
