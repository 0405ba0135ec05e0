"""The per-rank resource time series: a background thread samples counters into telemetry/rank{R}.csv.

Each row describes the interval since the previous row (`interval_s`), labelled with the phase the rank was
in (setup, train, eval, finish): changing phase takes a sample first, so no interval straddles two phases.
Rates are counter differences over the interval, so totals (bytes, packets, CPU seconds, joules) are sums
of rate × interval, exact and resumable from the file alone. Host-wide figures (network, CPU package
energy) are written by local rank 0 of each host only, so nothing is counted twice. An empty cell means the
counter does not exist here — never 0.
"""

from __future__ import annotations

import csv
import io
import threading
import time
from pathlib import Path

import psutil

from distcnn.record import host_name, read_rows, write_atomic
from distcnn.telemetry.counters import Nvml, Rapl, network_counters, rss_peak_bytes

HEAD = ["time", "elapsed_s", "interval_s", "phase", "epoch", "host", "rank", "local_rank",
        "process_cpu_percent", "process_cpu_seconds", "rss_bytes", "rss_peak_bytes",
        "system_cpu_percent", "system_mem_percent", "net_bytes_per_s", "net_packets_per_s"]
TAIL = ["cpu_energy_joules", "cpu_power_watts", "gpu_util_percent", "gpu_memory_used_bytes",
        "gpu_power_watts", "gpu_energy_joules"]
NET_FIELDS = ("rx_bytes_per_s", "tx_bytes_per_s", "rx_packets_per_s", "tx_packets_per_s")


def interface_columns(interface: str) -> list[str]:
    return [f"net.{interface}.{field}" for field in NET_FIELDS]


class ResourceSampler:
    """Samples this rank's (and, on local rank 0, this host's) counters every `interval` seconds."""

    def __init__(self, path: Path, interval: float, *, rank: int, local_rank: int, host_level: bool,
                 run_interfaces: list[str], cuda_index: int | None = None):
        self.path = Path(path)
        self.interval = interval
        self.rank, self.local_rank, self.host_level = rank, local_rank, host_level
        self.host = host_name()
        self.run_interfaces = list(run_interfaces)
        self.process = psutil.Process()
        self.interfaces = sorted(network_counters()) if host_level else []
        self.rapl = Rapl() if host_level else None
        self.gpu = Nvml(cuda_index)
        self.columns = HEAD + [c for i in self.interfaces for c in interface_columns(i)] + TAIL
        self.phase, self.epoch = "setup", 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.rows = self._load()
        self.origin = self.rows[0]["time"] if self.rows else time.time()
        self._prime()

    @property
    def energy_sources(self) -> list[str]:
        sources = list(self.rapl.names) if self.rapl is not None else []
        return sources + ([self.gpu.name] if self.gpu.available else [])

    # -- the series file -------------------------------------------------------------------------------

    def _load(self) -> list[dict]:
        """Rows of an earlier attempt of this run (a resume): kept, and rewritten whole without a torn line."""
        if not self.path.exists():
            return []
        rows, header = read_rows(self.path)
        self.columns += [c for c in header if c not in self.columns]
        self._rewrite(rows)
        return rows

    def _rewrite(self, rows: list[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
        write_atomic(self.path, lambda handle: handle.write(buffer.getvalue()))

    def _append(self, row: dict) -> None:
        """One write per row, flushed: a killed rank loses at most the row being written."""
        if not self.path.exists():
            self._rewrite([])
        line = io.StringIO()
        csv.DictWriter(line, fieldnames=self.columns, extrasaction="ignore").writerow(
            {k: _cell(v) for k, v in row.items()})
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line.getvalue())

    # -- sampling --------------------------------------------------------------------------------------

    def _prime(self) -> None:
        self.last_time = time.time()
        times = self.process.cpu_times()
        self.last_cpu = times.user + times.system
        self.last_system = psutil.cpu_times()
        self.last_net = network_counters() if self.host_level else {}

    def sample(self) -> dict:
        with self.lock:
            return self._sample()

    def _sample(self) -> dict:
        now = time.time()
        interval = max(now - self.last_time, 1e-9)
        times = self.process.cpu_times()
        cpu = times.user + times.system
        row = {
            "time": now, "elapsed_s": now - self.origin, "interval_s": interval, "phase": self.phase,
            "epoch": self.epoch, "host": self.host, "rank": self.rank, "local_rank": self.local_rank,
            "process_cpu_percent": 100 * (cpu - self.last_cpu) / interval, "process_cpu_seconds": cpu,
            "rss_bytes": self.process.memory_info().rss, "rss_peak_bytes": rss_peak_bytes(),
            "system_cpu_percent": self._system_cpu_percent(),
            "system_mem_percent": psutil.virtual_memory().percent,
        }
        if self.host_level:
            row |= self._network(interval)
            joules = self.rapl.joules_since_last()
            if joules is not None:
                row |= {"cpu_energy_joules": joules, "cpu_power_watts": joules / interval}
        if self.gpu.available:
            reading = self.gpu.read()
            cumulative = reading.pop("gpu_energy_joules")
            if cumulative is not None:
                reading["gpu_energy_joules"] = cumulative - getattr(self, "gpu_energy_so_far", 0.0)
                self.gpu_energy_so_far = cumulative
            row |= reading
        self.last_time, self.last_cpu = now, cpu
        self.rows.append(row)
        self._append(row)
        return row

    def _system_cpu_percent(self) -> float | None:
        """Busy share of all cores since the last sample; None when no clock tick passed (too short to tell)."""
        now, before = psutil.cpu_times(), self.last_system
        self.last_system = now
        idle = (now.idle + getattr(now, "iowait", 0)) - (before.idle + getattr(before, "iowait", 0))
        elapsed = sum(now) - sum(before)
        return 100 * max(0.0, elapsed - idle) / elapsed if elapsed > 0 else None

    def _network(self, interval: float) -> dict:
        now = network_counters()
        row, run_bytes, run_packets = {}, 0, 0
        for interface in self.interfaces:
            before, after = self.last_net.get(interface), now.get(interface)
            if before is None or after is None:  # an interface that came or went: unknown, not 0
                continue
            rx_b, tx_b, rx_p, tx_p = (max(0, a - b) for a, b in zip(after, before))
            for column, value in zip(interface_columns(interface), (rx_b, tx_b, rx_p, tx_p)):
                row[column] = value / interval
            if interface in self.run_interfaces:
                run_bytes += rx_b + tx_b
                run_packets += rx_p + tx_p
        self.last_net = now
        row["net_bytes_per_s"] = run_bytes / interval
        row["net_packets_per_s"] = run_packets / interval
        return row

    def set_phase(self, phase: str, epoch: int | None = None) -> None:
        """Close the interval under the old phase, then label what follows with the new one."""
        with self.lock:
            if self.thread is not None:
                self._sample()
            self.phase = phase
            if epoch is not None:
                self.epoch = epoch

    @property
    def latest(self) -> dict:
        return self.rows[-1] if self.rows else {}

    def start(self) -> "ResourceSampler":
        self.stopped.clear()
        self.thread = threading.Thread(target=self._loop, name="distcnn-sampler", daemon=True)
        self.thread.start()
        return self

    def _loop(self) -> None:
        next_time = time.monotonic() + self.interval
        while not self.stopped.wait(max(0.0, next_time - time.monotonic())):
            self.sample()
            next_time = max(next_time + self.interval, time.monotonic())

    def stop(self) -> None:
        if self.thread is None:
            return
        self.stopped.set()
        self.thread.join()
        self.sample()
        self.thread = None

    # -- figures for the summary -----------------------------------------------------------------------

    def summary(self, phase: str = "train", epoch: int | None = None) -> dict:
        """This rank's figures over the intervals spent in `phase` (of one epoch, or all), in every attempt."""
        with self.lock:
            every = list(self.rows)
        rows = [r for r in every if r.get("phase") == phase and (epoch is None or r.get("epoch") == epoch)]
        figures = {
            "rank": self.rank, "local_rank": self.local_rank, "host": self.host, "host_level": self.host_level,
            "seconds": sum(r["interval_s"] for r in rows),
            "process_cpu_percent_mean": time_weighted_mean(rows, "process_cpu_percent"),
            "cpu_seconds": total(rows, "process_cpu_percent", scale=0.01),
            "rss_peak_bytes": maximum(every, "rss_peak_bytes"),
            "system_cpu_percent_mean": time_weighted_mean(rows, "system_cpu_percent"),
            "system_mem_percent_mean": time_weighted_mean(rows, "system_mem_percent"),
            "gpu_util_percent_mean": time_weighted_mean(rows, "gpu_util_percent"),
            "gpu_memory_peak_bytes": maximum(rows, "gpu_memory_used_bytes"),
            "gpu_energy_joules": plain_sum(rows, "gpu_energy_joules"),
            "energy_sources": self.energy_sources,
        }
        if self.host_level:
            interfaces = {}
            for interface in self.interfaces:
                rx_b, tx_b, rx_p, tx_p = (count(rows, c) for c in interface_columns(interface))
                interfaces[interface] = {"rx_bytes": rx_b, "tx_bytes": tx_b, "rx_packets": rx_p, "tx_packets": tx_p}
            figures |= {
                "net_interfaces": self.run_interfaces,
                "net_bytes_total": count(rows, "net_bytes_per_s"),
                "net_packets_total": count(rows, "net_packets_per_s"),
                "net_bytes_per_s_mean": time_weighted_mean(rows, "net_bytes_per_s"),
                "net_packets_per_s_mean": time_weighted_mean(rows, "net_packets_per_s"),
                "interfaces": interfaces,
                "cpu_energy_joules": plain_sum(rows, "cpu_energy_joules"),
            }
        return figures


def _present(rows: list[dict], column: str) -> list[dict]:
    return [r for r in rows if r.get(column) is not None]


def time_weighted_mean(rows: list[dict], column: str) -> float | None:
    rows = _present(rows, column)
    seconds = sum(r["interval_s"] for r in rows)
    return sum(r[column] * r["interval_s"] for r in rows) / seconds if seconds > 0 else None


def total(rows: list[dict], column: str, scale: float = 1.0) -> float | None:
    """The integral of a rate over the intervals: bytes from bytes/s, CPU seconds from CPU %."""
    rows = _present(rows, column)
    return sum(r[column] * r["interval_s"] for r in rows) * scale if rows else None


def count(rows: list[dict], column: str) -> int | None:
    """A total of whole things (bytes, packets): the integer the counters' differences summed to."""
    value = total(rows, column)
    return round(value) if value is not None else None


def plain_sum(rows: list[dict], column: str) -> float | None:
    rows = _present(rows, column)
    return sum(r[column] for r in rows) if rows else None


def maximum(rows: list[dict], column: str) -> float | None:
    rows = _present(rows, column)
    return max(r[column] for r in rows) if rows else None


def _cell(value) -> str:
    return "" if value is None else value
