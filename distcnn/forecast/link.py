"""Link profiles: what a collective costs on a given cluster, measured by `distcnn forecast --calibrate` and
read back by later forecasts (`--link-profile FILE`).

A calibration times allreduce on the cluster it runs on (distcnn.forecast.calibrate_worker): for each link it
was run at, the median time of allreduces from 4 KiB up, and the slowdown of a compute loop while an allreduce
runs beside it. Fitted from those points, by least squares on t = α + 2(n−1)/n · S / B_eff:

    alpha_s          α(n) of the calibration's n ranks; hop_s = α / (2(n−1)) − the link's added delay
    bytes_per_s      B_eff; share = B_eff / (link rate / 8) where the link had a cap
    chain_hop_s      the hop of an allreduce PowerSGD issues from its last one's callback: a timed PowerSGD
                     bucket ÷ its three allreduces (their bytes are a few KiB)
    slowdown_s_per_byte  compute seconds lost per byte a rank sends while it computes (the fastest link's
                     calibration: where the most bytes were sent, the best measured; a property of the hosts)
    slowdown_s_per_message  compute seconds lost per message sent beside it, beyond its bytes: the loop beside
                     4 KiB allreduces (measured at every link, which does not slow a message that small: their
                     median)
    idle_*           α, B_eff and PowerSGD's chain again, timed with no compute beside the buckets: what a
                     message costs that the rank waits for (after backward, the buffers' broadcast, a chain that
                     holds backward). α, B_eff and the chain above are timed beside a compute loop, as a bucket
                     sent while backward computes is; on a CPU the two differ (the collective's threads share the
                     cores or have them). Profiles written before these were measured use the busy figures
    burst_bytes      the rate shaper's token bucket, read from the hosts' qdisc (tc tbf's burst) on the
                     emulated cluster; 0 on real machines, whose links have no shaper distcnn can see. Bytes
                     it covers go at the uncapped calibration's B_eff

    compute_factor   a run's compute on these ranks ÷ what its one-rank profile measured: the median of the
                     factors fitted on --reference-runs short reference runs of the calibration's own
                     configuration (its model, batch; each run with its own profile) over the fastest link,
                     where compute dominates (emulated hosts and one machine; 1 on real machines, where the
                     reference would need every node)

A forecast at a link rate that was not calibrated takes the share, hop and slowdown of the calibrated cap
nearest in rate (on a log scale) and says so. Without a link profile, B_eff is the nominal rate, hop and
slowdown 0, and every row says "uncalibrated".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from distcnn.errors import UsageError
from distcnn.forecast.model import Link

FORMAT = "distcnn-link-profile/1"
KINDS = ("emulated", "machines")  # emulated hosts on one machine, or real machines (torchrun, Slurm)


@dataclass(frozen=True)
class Calibrated:
    """One calibrated link: its nominal rate (None: uncapped), added delay and what was fitted."""

    rate_bits: float | None
    latency_s: float
    alpha_s: float
    bytes_per_s: float
    slowdown_s_per_byte: float
    ranks: int
    points: list  # [[bytes, seconds], ...]: the medians the fit used
    powersgd_bucket_s: float | None = None  # one PowerSGD bucket's chain of three allreduces, measured
    burst_bytes: float = 0.0  # the rate shaper's bucket as the hosts' qdisc has it (emulated caps); 0: none
    slowdown_s_per_message: float = 0.0  # compute seconds lost per message sent beside it, beyond its bytes
    # the same timed with nothing computing beside the buckets (None: not measured, the busy figures hold)
    idle_alpha_s: float | None = None
    idle_bytes_per_s: float | None = None
    idle_points: list | None = None
    powersgd_bucket_idle_s: float | None = None

    def _hop(self, alpha: float | None) -> float | None:
        return None if alpha is None else max(0.0, alpha / (2 * (self.ranks - 1)) - self.latency_s)

    @property
    def hop_s(self) -> float:
        return self._hop(self.alpha_s)

    @property
    def idle_hop_s(self) -> float | None:
        return self._hop(self.idle_alpha_s)

    @property
    def chain_hop_s(self) -> float | None:
        """The hop of each of PowerSGD's three allreduces per bucket (their bytes are a few KiB)."""
        return self._hop(None if self.powersgd_bucket_s is None else self.powersgd_bucket_s / 3)

    @property
    def idle_chain_hop_s(self) -> float | None:
        return self._hop(None if self.powersgd_bucket_idle_s is None else self.powersgd_bucket_idle_s / 3)

    @property
    def share(self) -> float | None:
        return self.bytes_per_s / (self.rate_bits / 8) if self.rate_bits else None


def fit(points: list[tuple[float, float]], ranks: int, alpha: float | None = None) -> tuple[float, float]:
    """(α, B_eff) from (bytes, seconds) medians: α the intercept of a least-squares line weighted for relative
    error (or the α given: the per-message cost is the hosts' and the software's, best measured on the fastest
    link), B_eff from the two largest sizes, where the bytes dominate (and a tbf cap's burst does not)."""
    import numpy as np

    ring = 2 * (ranks - 1) / ranks
    sizes = np.array([size for size, _ in points], dtype=float) * ring
    seconds = np.array([second for _, second in points], dtype=float)
    if alpha is None:
        slope, intercept = np.polyfit(sizes, seconds, 1, w=1 / seconds)
        alpha = max(0.0, float(intercept))
    top = np.argsort(sizes)[-2:]
    rates = [sizes[i] / (seconds[i] - alpha) for i in top if seconds[i] > alpha]
    return alpha, float(np.median(rates)) if rates else math.inf


@dataclass(frozen=True)
class LinkProfile:
    kind: str  # emulated | machines
    backend: str  # gloo | nccl
    scope: str  # inter: one rank per host, between hosts; intra: ranks of one host
    hosts: list[str]
    entries: list[Calibrated]
    source: str = ""
    compute_factor: float = 1.0  # a run's compute ÷ its profile's, fitted on `reference` (1: not fitted)
    reference: dict | None = None  # the runs it was fitted on: config, each run's measured and predicted step

    def as_dict(self) -> dict:
        return {"format": FORMAT, "kind": self.kind, "backend": self.backend, "scope": self.scope,
                "hosts": self.hosts, "compute_factor": self.compute_factor, "reference": self.reference,
                "entries": [entry.__dict__ | {"hop_s": entry.hop_s, "chain_hop_s": entry.chain_hop_s,
                                              "idle_hop_s": entry.idle_hop_s,
                                              "idle_chain_hop_s": entry.idle_chain_hop_s, "share": entry.share}
                            for entry in self.entries]}

    def write(self, path: Path) -> None:
        from distcnn.record import write_json

        write_json(Path(path), self.as_dict())

    def nearest(self, rate_bits: float | None) -> Calibrated:
        """The calibrated entry for a link rate: the same cap, else the nearest on a log scale (uncapped
        counts as its measured B_eff)."""
        def distance(entry: Calibrated) -> float:
            measured = entry.rate_bits or entry.bytes_per_s * 8
            wanted = rate_bits or math.inf
            return 0.0 if entry.rate_bits == rate_bits else abs(math.log(measured) - math.log(min(wanted, 1e15)))
        return min(self.entries, key=distance)

    def link(self, rate_bits: float | None, latency_s: float) -> tuple[Link, str]:
        """The Link a forecast uses at this rate and delay, and where its figures come from."""
        entry = self.nearest(rate_bits)
        if rate_bits is None:
            if entry.rate_bits is not None:
                raise UsageError(f"bandwidth none (uncapped) was not calibrated in {self.source}: calibrate with "
                                 "--bandwidth none, or give the link's rate")
            how = "calibrated uncapped"
        elif entry.rate_bits is None:
            how = "uncapped calibration; B_eff capped at the rate"
        else:
            how = "calibrated" if entry.rate_bits == rate_bits else \
                f"share of the {format_rate(entry.rate_bits)} calibration"

        def effective(measured: float | None) -> float | None:  # B_eff at this rate from the entry's
            if measured is None or rate_bits is None:
                return measured
            if entry.rate_bits is None:
                return min(measured, rate_bits / 8)
            return measured / (entry.rate_bits / 8) * rate_bits / 8

        uncapped = [other.bytes_per_s for other in self.entries if other.rate_bits is None]
        burst = entry.burst_bytes if rate_bits is not None else 0.0
        return Link(effective(entry.bytes_per_s), latency_s, entry.hop_s, self.slowdown_s_per_byte,
                    self.compute_factor, entry.chain_hop_s, burst, uncapped[0] if uncapped else math.inf,
                    self.slowdown_s_per_message, entry.idle_hop_s, effective(entry.idle_bytes_per_s),
                    entry.idle_chain_hop_s), how

    @property
    def fastest(self) -> Calibrated:
        """The calibration of the fastest link: where the hosts' own costs (per message, per byte of CPU) are
        measured best, since the rate slows nothing there."""
        return max(self.entries, key=lambda entry: entry.bytes_per_s)

    @property
    def slowdown_s_per_message(self) -> float:
        """What a 4 KiB message costs the compute beside it is the hosts' too, and no cap slows so small a
        message: every link's calibration measured it once, and the median of those is kept (one measurement
        on this 2-core machine ranged from 0.7 to 6.1 ms)."""
        import statistics

        return statistics.median(entry.slowdown_s_per_message for entry in self.entries)

    @property
    def slowdown_s_per_byte(self) -> float:
        """The CPU a byte sent costs is the hosts' (reductions, copies, the network stack), not the link's: taken
        from the calibration that sent the most bytes (the fastest link), where it is measured best."""
        return self.fastest.slowdown_s_per_byte


def uncalibrated(rate_bits: float | None, latency_s: float) -> tuple[Link, str]:
    if rate_bits is None:
        raise UsageError("bandwidth none (uncapped) needs a measured link: give --link-profile FILE "
                         "(distcnn forecast --calibrate writes one), or a rate such as 1gbit")
    return Link(rate_bits / 8, latency_s), "uncalibrated (B_eff = rate, no hop latency)"


def read(path: str | Path) -> LinkProfile:
    """A link profile written by --calibrate; one line when the file is missing, damaged or of another kind."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--link-profile {path}: no such file (write one with distcnn forecast --calibrate)") \
            from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UsageError(f"--link-profile {path}: not a link profile ({error.__class__.__name__}: {error}); "
                         "calibrate again with distcnn forecast --calibrate") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not data.get("entries"):
        raise UsageError(f"--link-profile {path}: not a distcnn link profile (format {FORMAT!r} expected); "
                         "calibrate again with distcnn forecast --calibrate")
    try:
        entries = [Calibrated(entry["rate_bits"], entry["latency_s"], entry["alpha_s"], entry["bytes_per_s"],
                              entry["slowdown_s_per_byte"], entry["ranks"], entry["points"],
                              entry.get("powersgd_bucket_s"), float(entry.get("burst_bytes") or 0.0),
                              float(entry.get("slowdown_s_per_message") or 0.0), entry.get("idle_alpha_s"),
                              entry.get("idle_bytes_per_s"), entry.get("idle_points"),
                              entry.get("powersgd_bucket_idle_s"))
                   for entry in data["entries"]]
        return LinkProfile(data["kind"], data["backend"], data["scope"], data["hosts"], entries, str(path),
                           float(data.get("compute_factor", 1.0)), data.get("reference"))
    except (KeyError, TypeError) as error:
        raise UsageError(f"--link-profile {path}: damaged (missing {error}); calibrate again") from None


def shaper_burst(caps: str) -> float:
    """The token bucket of a tbf qdisc as `tc qdisc show` words it ("tbf rate 10Mbit burst 64Kb lat 100ms":
    bytes, with tc's Kb and Mb of 1024), 0 when the caps have none."""
    import re

    found = re.search(r"\bburst (\d+(?:\.\d+)?)(Mb|Kb|b)\b", caps or "")
    if not found:
        return 0.0
    return float(found.group(1)) * {"Mb": 2**20, "Kb": 2**10, "b": 1}[found.group(2)]


def check_matches(profile: LinkProfile, kind: str, backend: str) -> None:
    """A link measured on another kind of cluster, or with another backend, says nothing about this one."""
    if profile.kind != kind:
        raise UsageError(f"--link-profile {profile.source} was calibrated on {profile.kind} hosts, but this "
                         f"forecast is for {kind} hosts ({'--cluster emulated' if kind == 'emulated' else 'no --cluster emulated'}); "
                         f"calibrate on this cluster with distcnn forecast --calibrate")
    if profile.backend != backend:
        raise UsageError(f"--link-profile {profile.source} measured the {profile.backend} backend, but this "
                         f"forecast's ranks use {backend} (--device); calibrate with the same device")


def format_rate(bits: float | None) -> str:
    if bits is None:
        return "uncapped"
    for unit, size in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits >= size:
            return f"{bits / size:g}{unit}"
    return f"{bits:g}bit"
