"""The run's resource figures for summary.json, combined from every rank's sampler.

Per-rank figures (process CPU, RSS, GPU) combine over ranks; host figures (system CPU and memory, network,
CPU package energy) come from local rank 0 of each host and combine over hosts, each host also kept apart
under `hosts`. A figure no rank could measure stays None.
"""

from __future__ import annotations


def _values(items: list[dict], key: str) -> list[float]:
    return [item[key] for item in items if item.get(key) is not None]


def _mean(items: list[dict], key: str) -> float | None:
    values = _values(items, key)
    return sum(values) / len(values) if values else None


def _sum(items: list[dict], key: str) -> float | None:
    values = _values(items, key)
    return sum(values) if values else None


def _max(items: list[dict], key: str) -> float | None:
    values = _values(items, key)
    return max(values) if values else None


def combine_ranks(per_rank: list[dict]) -> dict:
    """Summary fields from the `ResourceSampler.summary()` of every rank (in rank order)."""
    hosts = [figures for figures in per_rank if figures.get("host_level")]
    cpu_energy, gpu_energy = _sum(hosts, "cpu_energy_joules"), _sum(per_rank, "gpu_energy_joules")
    energies = [e for e in (cpu_energy, gpu_energy) if e is not None]
    return {
        "cpu_percent_mean": _mean(hosts, "system_cpu_percent_mean"),
        "process_cpu_percent_mean": _mean(per_rank, "process_cpu_percent_mean"),
        "cpu_seconds_total": _sum(per_rank, "cpu_seconds"),
        "mem_percent_mean": _mean(hosts, "system_mem_percent_mean"),
        "rss_peak_bytes": _max(per_rank, "rss_peak_bytes"),
        "gpu_util_percent_mean": _mean(per_rank, "gpu_util_percent_mean"),
        "gpu_memory_peak_bytes": _max(per_rank, "gpu_memory_peak_bytes"),
        "net_packets_per_s_mean": _sum(hosts, "net_packets_per_s_mean"),
        "net_bytes_per_s_mean": _sum(hosts, "net_bytes_per_s_mean"),
        "net_bytes_total": _sum(hosts, "net_bytes_total"),
        "energy_joules": sum(energies) if energies else None,
        "energy_sources": sorted({source for figures in per_rank for source in figures.get("energy_sources", [])}),
        "hosts": _by_host(hosts, per_rank),
    }


def _by_host(hosts: list[dict], per_rank: list[dict]) -> dict:
    """Host name -> its figures; two node agents on one machine (same name) stay apart by their first rank."""
    names = [figures["host"] for figures in hosts]
    return {(name if names.count(name) == 1 else f"{name} (rank {figures['rank']})"): _host(figures, per_rank)
            for name, figures in zip(names, hosts)}


def _host(figures: dict, per_rank: list[dict]) -> dict:
    return {
        "ranks": [r["rank"] for r in per_rank if r["host"] == figures["host"]
                  and r["rank"] - r["local_rank"] == figures["rank"]],
        "net_interfaces": figures["net_interfaces"],
        "net_bytes_total": figures["net_bytes_total"],
        "net_packets_total": figures["net_packets_total"],
        "net_bytes_per_s_mean": figures["net_bytes_per_s_mean"],
        "net_packets_per_s_mean": figures["net_packets_per_s_mean"],
        "cpu_percent_mean": figures["system_cpu_percent_mean"],
        "mem_percent_mean": figures["system_mem_percent_mean"],
        "cpu_energy_joules": figures["cpu_energy_joules"],
        "interfaces": figures["interfaces"],
    }
