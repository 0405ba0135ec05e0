"""The forecast's one model: a data-parallel step on n ranks from a one-rank profile and a link.

    allreduce(S, n)  = α(n) + 2(n−1)/n · S / B_eff          ring allreduce of S bytes over n ranks
    α(n)             = 2(n−1) · (hop + latency)              2(n−1) ring steps, each a message over one link
    bucket i         starts at max(ready_i, end_{i−1}), ends start + Σ allreduce(message) of its hook
    step             = data + augmentation + forward + broadcast(buffers)
                       + max(backward end, last bucket's end) + optimizer + the hook's own compute
                       + σ · E[max of n standard normals]     the ranks wait for the slowest at every step
    tokens           a rate shaper's bucket (tc tbf's burst), refilled at B_eff while the link is idle: the
                     first bytes of a message after a pause go at the line rate
    busy / idle      hop and B_eff of a message begun while backward computes, and of one the rank waits for
                     (after backward; the buffers' broadcast; PowerSGD's chain on gloo, which holds backward):
                     on a CPU the collective's threads share the cores with the compute, or have them

`ready_i` is when the last gradient of bucket i is ready in the profiled backward pass, stretched by the
compute slowdown while communication overlaps it (`slowdown` seconds of compute per byte a rank sends while
backward computes, and `slowdown_per_message` per message begun before backward ends: on a CPU the
collective's reductions, its threads and the network stack take cores). Ranks that share a machine compete for its cores,
caches and memory bandwidth: the profile is timed with as many processes training beside it
(distcnn.forecast.alongside), so its phases already carry that. What a run of n ranks adds to its compute
beyond that (the collective's threads, the launcher's agents, the trainer's own bookkeeping, waiting for the
slowest rank at DDP's buffer broadcast) is one factor, `compute_factor`, fitted by --calibrate on a reference
run of the cluster and applied to every phase. Buckets are DDP's own, rebuilt in the
order the gradients became ready with torch's bucket assignment (`_compute_bucket_assignment_by_size`, first
bucket 1 MB unless a cap is given). What each hook sends per bucket: allreduce its bytes; fp16 and bf16 half;
PowerSGD three allreduces one after another: the tensors it leaves uncompressed, then its P, then its Q
factors (rank r), with torch's own rule for which tensors are worth compressing; each issued from the last
one's callback, at a hop cost of its own (`chain_hop`, calibrated). On gloo, distcnn waits for
each PowerSGD bucket's whole chain before DDP hands over the next (distcnn.comm.one_bucket_at_a_time), so
that chain is not overlapped: backward stops while it runs (`blocking`).

A node's ranks form one ring with the other nodes' ranks; a ring step is as slow as its slowest link, so
with several nodes the link between nodes sets B_eff and latency, with one node the link inside it. DDP also
broadcasts the module's buffers (BatchNorm statistics) from rank 0 at every forward: one message of their
bytes, hop + latency + S / B_eff, idle.

No measurement here: the profile (distcnn.forecast.profile) and the link (distcnn.forecast.link) bring them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

HOOKS = ("allreduce", "fp16", "bf16", "powersgd")
DEFAULT_CAP_MB = 25.0  # DDP's bucket_cap_mb
FIRST_BUCKET_BYTES = 1024 * 1024  # DDP's first bucket when the cap is its default (torch's _DEFAULT_FIRST_BUCKET_BYTES)
CAPS_TRIED_MB = (1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0)
# a cap is recommended over DDP's default only where it is forecast this much faster, more than the forecast's
# own error: measured on 2 pinned emulated hosts (3 runs each, three benchmarks), resnet18 b32 uncapped was
# forecast 6-19 % faster at 2-5 MB and ran 4-11 % faster; deepcnn b32 at 1gbit was forecast 6-8 % faster at
# 1 MB and ran 1-2 % slower (README: where the model is known to be wrong)
MIN_CAP_GAIN = 0.05
POWERSGD_MIN_COMPRESSION_RATE = 2  # PowerSGDState's default


@dataclass(frozen=True)
class Gradient:
    """One parameter's gradient: its shape, element size and when it is ready (s into backward)."""

    shape: tuple[int, ...]
    element_size: int
    ready_s: float

    @classmethod
    def of(cls, row: dict) -> Gradient:
        """From a row of distcnn.telemetry.gradients.GradientReadiness.read (shape, bytes, ready_s)."""
        shape = tuple(row["shape"])
        return cls(shape, row["bytes"] // max(1, math.prod(shape)), row["ready_s"])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes(self) -> int:
        return self.numel * self.element_size


@dataclass(frozen=True)
class Profile:
    """One rank's steady-state step: mean seconds per phase, and its gradients in the order they are ready."""

    phases: dict[str, float]  # data_wait, augmentation, forward, backward, optimizer
    gradients: tuple[Gradient, ...]
    batch_size: int  # images per step per rank
    buffer_bytes: int = 0  # what DDP broadcasts at every forward
    hook_compute: dict[str, float] = field(default_factory=dict)  # a hook's own compute per step (s), measured
    train_images: int | None = None  # an epoch's images (for epoch and whole-training times)
    eval_seconds: float | None = None  # one rank's validation pass over the whole validation split
    step_stdev_s: float = 0.0  # the spread of its steps (standard deviation): what the slowest of n ranks adds

    @property
    def compute_seconds(self) -> float:
        return sum(self.phases.values())


@dataclass(frozen=True)
class Link:
    """What a collective costs between ranks: effective bytes per second, per-message hop latency (software)
    and added one-way delay, and the compute slowdown per byte sent while communication overlaps compute."""

    bytes_per_s: float
    latency_s: float = 0.0
    hop_s: float = 0.0
    slowdown_s_per_byte: float = 0.0
    compute_factor: float = 1.0  # a run's compute on n ranks ÷ the profile's, fitted on a reference run
    chain_hop_s: float | None = None  # hop of an allreduce issued from a future's callback (PowerSGD's chain)
    burst_bytes: float = 0.0  # a rate shaper's token bucket (tc tbf's burst): bytes sent at line rate after idle
    line_bytes_per_s: float = math.inf  # how fast those go: the link's uncapped B_eff (inf: not measured)
    slowdown_s_per_message: float = 0.0  # compute seconds lost per message sent while computing
    # the same collective while the rank's compute waits for it (after backward; the broadcast before forward;
    # PowerSGD's chain on gloo): its threads have the cores to themselves (None: as while computing)
    idle_hop_s: float | None = None
    idle_bytes_per_s: float | None = None
    idle_chain_hop_s: float | None = None

    def hop(self, chained: bool = False, busy: bool = True) -> float:
        """One ring step's software cost: PowerSGD's chained allreduces have their own, and a message the rank
        waits for its figure measured alone (each the plainer figure where it was not measured)."""
        busy_hop = self.chain_hop_s if chained and self.chain_hop_s is not None else self.hop_s
        idle_hop = self.idle_chain_hop_s if chained else self.idle_hop_s
        return busy_hop if busy or idle_hop is None else idle_hop

    def alpha(self, n: int, chained: bool = False, busy: bool = True) -> float:
        return 2 * (n - 1) * (self.hop(chained, busy) + self.latency_s)

    def rate(self, busy: bool = True) -> float:
        return self.bytes_per_s if busy or self.idle_bytes_per_s is None else self.idle_bytes_per_s

    def allreduce(self, size: float, n: int, chained: bool = False, tokens: float = 0.0, busy: bool = True) -> float:
        """Seconds of a ring allreduce of `size` bytes, begun while the rank computes (`busy`) or while it waits;
        the first `tokens` bytes a rank sends (a shaper's bucket, refilled while the link was idle) go at the
        line rate."""
        if n <= 1:
            return 0.0
        wire = 2 * (n - 1) / n * size
        covered = min(tokens, wire)
        return self.alpha(n, chained, busy) + (wire - covered) / self.rate(busy) + covered / self.line_bytes_per_s

    def broadcast(self, size: float, n: int) -> float:
        """DDP's broadcast of the buffers before forward: the rank waits for it, computing nothing."""
        if n <= 1 or size <= 0:
            return 0.0
        return self.hop(busy=False) + self.latency_s + size / self.rate(busy=False)


@dataclass(frozen=True)
class Step:
    """The forecast of one step on n ranks, with what it is made of."""

    seconds: float
    compute_seconds: float  # the same step with no communication at all
    comm_seconds: float  # the buckets' collectives, end to end, overlapped or not
    wire_bytes: float  # bytes one rank sends per step (ring: 2(n−1)/n of each message)
    buckets: int

    @property
    def exposed_comm_share(self) -> float:
        return max(0.0, self.seconds - self.compute_seconds) / self.seconds if self.seconds else 0.0


def bucket_caps(cap_mb: float | None) -> list[int]:
    """DDP's bucket size limits after its rebuild: [first, then] (its 1 MB first bucket only at the default)."""
    if cap_mb is None:
        return [FIRST_BUCKET_BYTES, int(DEFAULT_CAP_MB * 1024 * 1024)]
    return [int(cap_mb * 1024 * 1024)] * 2


def buckets(gradients: tuple[Gradient, ...], cap_mb: float | None) -> list[list[Gradient]]:
    """The gradients grouped as DDP groups them after its rebuild: torch's own assignment by size, over the
    gradients in the order they became ready."""
    import torch
    import torch.distributed as dist

    if not gradients:
        return []
    dtypes = {1: torch.uint8, 2: torch.float16, 4: torch.float32, 8: torch.float64}
    tensors = [torch.empty(g.shape, dtype=dtypes[g.element_size], device="meta") for g in gradients]
    indices, _ = dist._compute_bucket_assignment_by_size(tensors, bucket_caps(cap_mb))
    return [[gradients[i] for i in bucket] for bucket in indices]


def messages(bucket: list[Gradient], hook: str, powersgd_rank: int = 1) -> list[float]:
    """Bytes of each allreduce a hook issues for one bucket, in order."""
    size = sum(g.bytes for g in bucket)
    if hook == "allreduce":
        return [size]
    if hook in ("fp16", "bf16"):
        return [sum(g.numel for g in bucket) * 2]
    if hook != "powersgd":
        raise ValueError(f"unknown comm hook {hook!r}")
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

    uncompressed = p = q = 0
    for g in bucket:
        n = g.shape[0] if g.shape else 1
        m = g.numel // n if n else 0
        rank = min(n, m, powersgd_rank)
        if _should_compress(n, m, rank, POWERSGD_MIN_COMPRESSION_RATE)[0]:
            p, q = p + n * rank * g.element_size, q + m * rank * g.element_size
        else:
            uncompressed += g.bytes
    return [uncompressed, p, q]


def step(profile: Profile, link: Link, n: int, hook: str = "allreduce", cap_mb: float | None = None,
         powersgd_rank: int = 1, blocking_powersgd: bool = True) -> Step:
    """The step of `profile` on n ranks over `link`, with `hook` and DDP buckets of `cap_mb`."""
    if n <= 1:
        return Step(profile.compute_seconds, profile.compute_seconds, 0.0, 0.0, 0)
    factor = link.compute_factor
    phases = {phase: seconds * factor for phase, seconds in profile.phases.items()}
    compute = sum(phases.values())
    groups = buckets(profile.gradients, cap_mb)
    sent = [messages(bucket, hook, powersgd_rank) for bucket in groups]
    wire = sum(2 * (n - 1) / n * size for sizes in sent for size in sizes)
    backward = phases.get("backward", 0.0)
    forward = phases.get("forward", 0.0) + link.broadcast(profile.buffer_bytes, n)
    rest = (compute - backward - phases.get("forward", 0.0) + profile.hook_compute.get(hook, 0.0)
            + profile.step_stdev_s * factor * slowest_of(n))
    schedule = _Schedule(link, n, hook, hook == "powersgd" and blocking_powersgd)
    # What a pass of the schedule finds feeds the next: the messages sent while backward still computes
    # stretch it; a shaper's bucket refills while the link is idle between steps. The steps repeat, so the
    # schedule is worked out again from where the last one left off until it settles.
    tokens, last_end, overlapped, overlapped_bytes = link.burst_bytes, -math.inf, 0, 0.0  # bucket full at first
    settle = link.burst_bytes > 0 or link.slowdown_s_per_message > 0 or link.slowdown_s_per_byte > 0
    for _ in range(4 if settle else 1):
        lost = link.slowdown_s_per_byte * overlapped_bytes + link.slowdown_s_per_message * overlapped
        stretch = 1 + (lost / backward if backward else 0.0)
        free, comm, held, tokens, overlapped, overlapped_bytes = schedule.run(
            groups, sent, factor * stretch, backward * stretch, tokens, last_end)
        seconds = rest + forward + max(backward * stretch + held, free)
        last_end = free - seconds  # the step before ended its last message one step earlier
    return Step(seconds, compute, comm, wire, len(groups))


def slowest_of(n: int) -> float:
    """How many standard deviations the slowest of n ranks' steps is above their mean, expected (normal steps;
    Blom's approximation of the largest of n order statistics: 0.59 for 2, 1.04 for 4, 1.77 for 16). The
    ranks meet at every step's collectives, so each step takes as long as its slowest rank's."""
    from statistics import NormalDist

    return NormalDist().inv_cdf((n - 0.375) / (n + 0.25)) if n > 1 else 0.0


@dataclass(frozen=True)
class _Schedule:
    """Buckets sent one after another over a link, each from when it is ready or the last one is done."""

    link: Link
    n: int
    hook: str
    blocking: bool  # a PowerSGD chain that holds backward back while it runs (gloo)

    def run(self, groups: list[list[Gradient]], sent: list[list[float]], scale: float, backward: float,
            tokens: float, last_end: float) -> tuple[float, float, float, float, int, float]:
        """(when the last bucket is done, seconds of communication, compute held back, tokens left, messages
        begun while backward computed, bytes sent while it computed), times from the start of backward;
        `scale` stretches the profiled ready times as the run's compute is, `backward` its length. A message
        that overlaps the end of backward counts the share of its bytes sent before it."""
        link, ring = self.link, 2 * (self.n - 1) / self.n
        free = held = comm = 0.0  # when the collective is free; compute held back by blocking chains
        overlapped, overlapped_bytes = 0, 0.0
        for bucket, sizes in zip(groups, sent):
            ready = max(g.ready_s for g in bucket) * scale + held  # as measured, stretched alike
            start = took = max(ready, free)
            for size in sizes:
                computing = not self.blocking and took < backward + held  # begun while backward computes
                overlapped += computing
                tokens = min(link.burst_bytes, tokens + (took - last_end) * link.bytes_per_s)
                begun, took = took, took + link.allreduce(size, self.n, self.hook == "powersgd", tokens, computing)
                if computing:
                    overlapped_bytes += ring * size * min(1.0, (backward + held - begun) / max(took - begun, 1e-12))
                tokens, last_end = tokens - min(tokens, ring * size), took
            free, comm = took, comm + took - start
            if self.blocking:
                held += free - ready
        return free, comm, held, tokens, overlapped, overlapped_bytes


def best_cap(profile: Profile, link: Link, n: int, hook: str, powersgd_rank: int = 1,
             caps: tuple[float, ...] = CAPS_TRIED_MB, min_gain: float = MIN_CAP_GAIN) -> tuple[float | None, Step]:
    """The bucket cap (MB) of `caps` with the shortest forecast step, where it is at least `min_gain` shorter
    than with DDP's default; else the default (None): a smaller gain is within the forecast's own error, and
    the default is what a user gets without changing anything."""
    default = step(profile, link, n, hook, None, powersgd_rank)
    cap, best = min(((cap, step(profile, link, n, hook, cap, powersgd_rank)) for cap in caps),
                    key=lambda pair: pair[1].seconds)
    return (cap, best) if best.seconds < default.seconds * (1 - min_gain) else (None, default)


def with_phases(profile: Profile, **phases: float) -> Profile:
    return replace(profile, phases=profile.phases | phases)
