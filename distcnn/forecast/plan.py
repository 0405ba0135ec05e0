"""Forecast rows: a profile and a link, swept over nodes × bandwidth × comm hook, with epoch and training time,
node-hours, cost, and the bucket size the model predicts fastest.

One row per (nodes, bandwidth, hook), the `--json` contract:
    nodes, ranks_per_node, world_size, bandwidth_bits_per_s (null: uncapped), latency_s, comm_hook,
    bucket_cap_mb (null: DDP's default), step_seconds, compute_seconds, images_per_second, scaling_efficiency,
    exposed_comm_share, wire_bytes_per_step, buckets, steps_per_epoch, epoch_seconds, training_seconds,
    node_hours, cost, best_bucket_cap_mb, best_step_seconds, link (where the link's figures come from)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distcnn.forecast.link import LinkProfile, uncalibrated
from distcnn.forecast.model import Link, Profile, best_cap, step


@dataclass(frozen=True)
class Sweep:
    nodes: list[int]
    bandwidths: list[float | None]  # bits per second; None: uncapped
    latency_s: float
    ranks_per_node: int
    hooks: list[str]
    bucket_cap_mb: float | None
    epochs: int
    price_per_node_hour: float | None = None
    powersgd_rank: int = 1
    blocking_powersgd: bool = True  # gloo (distcnn.comm.one_bucket_at_a_time)


def link_at(links: LinkProfile | None, intra: LinkProfile | None, nodes: int, rate: float | None,
            latency_s: float) -> tuple[Link, str]:
    """The link a ring over `nodes` nodes is as slow as: between nodes, or inside the one node."""
    if nodes == 1 and intra is not None:
        return intra.link(None, 0.0)
    if links is None:
        return uncalibrated(rate, latency_s)
    return links.link(rate, latency_s)


def steps_per_epoch(train_images: int, world: int, batch: int) -> int:
    """DistributedSampler pads the shards to equal size; each rank steps through its shard in batches."""
    return math.ceil(math.ceil(train_images / world) / batch)


def rows(profile: Profile, sweep: Sweep, links: LinkProfile | None = None,
         intra: LinkProfile | None = None) -> list[dict]:
    out = []
    for rate in sweep.bandwidths:
        for hook in sweep.hooks:
            single = None
            for nodes in sorted(set(sweep.nodes) | {1}):
                world = nodes * sweep.ranks_per_node
                link, how = link_at(links, intra, nodes, rate, sweep.latency_s)
                if world > 1 and nodes == 1 and intra is None and links is None:
                    how = "uncalibrated (ranks of one node over the between-node link's rate)"
                predicted = step(profile, link, world, hook, sweep.bucket_cap_mb, sweep.powersgd_rank,
                                 sweep.blocking_powersgd)
                cap, best = best_cap(profile, link, world, hook, sweep.powersgd_rank)
                images = world * profile.batch_size / predicted.seconds
                single = images if nodes == 1 else single
                row = {"nodes": nodes, "ranks_per_node": sweep.ranks_per_node, "world_size": world,
                       "bandwidth_bits_per_s": rate, "latency_s": sweep.latency_s, "comm_hook": hook,
                       "bucket_cap_mb": sweep.bucket_cap_mb, "step_seconds": predicted.seconds,
                       "compute_seconds": predicted.compute_seconds, "images_per_second": images,
                       "scaling_efficiency": images / (nodes * single) if single else None,
                       "exposed_comm_share": predicted.exposed_comm_share,
                       "wire_bytes_per_step": predicted.wire_bytes, "buckets": predicted.buckets,
                       "best_bucket_cap_mb": cap, "best_step_seconds": best.seconds, "link": how}
                row |= _times(profile, sweep, world, predicted.seconds, nodes)
                if nodes in sweep.nodes:
                    out.append(row)
    return out


def _times(profile: Profile, sweep: Sweep, world: int, seconds: float, nodes: int) -> dict:
    if profile.train_images is None:
        return {"steps_per_epoch": None, "epoch_seconds": None, "training_seconds": None, "node_hours": None,
                "cost": None}
    per_epoch = steps_per_epoch(profile.train_images, world, profile.batch_size)
    epoch = per_epoch * seconds + (profile.eval_seconds or 0.0) / world
    training = sweep.epochs * epoch
    hours = nodes * training / 3600
    return {"steps_per_epoch": per_epoch, "epoch_seconds": epoch, "training_seconds": training,
            "node_hours": hours,
            "cost": hours * sweep.price_per_node_hour if sweep.price_per_node_hour is not None else None}


def fastest(found: list[dict]) -> dict | None:
    """The row with the most images per second among those with the most nodes (what a user renting that
    many would pick), and its recommended bucket cap."""
    if not found:
        return None
    most = max(row["nodes"] for row in found)
    return min((row for row in found if row["nodes"] == most), key=lambda row: row["best_step_seconds"])
