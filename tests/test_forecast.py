"""The forecast: the model's arithmetic on hand-made profiles whose answer is known, the profile of a real
configuration against what DDP and the hooks really do, link profiles, the command's one-line refusals, and one
real 2-host run checked against its forecast."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from statistics import NormalDist

import pytest

from distcnn.forecast import link as links
from distcnn.forecast import model, plan
from distcnn.forecast.model import Gradient, Link, Profile
from helpers import TWO_HOSTS_RATE, run_cli, usage_error

MB = 1024 * 1024


def hand_made(sizes_ready: list[tuple[int, float]], forward=0.01, backward=0.3, optimizer=0.005,
              **extra) -> Profile:
    """A profile of float32 gradients (bytes, ready s), ready in that order."""
    gradients = tuple(Gradient((size // 4,), 4, ready) for size, ready in sizes_ready)
    return Profile({"data_wait": 0.0, "augmentation": 0.0, "forward": forward, "backward": backward,
                    "optimizer": optimizer}, gradients, batch_size=32, **extra)


def test_one_bucket_over_a_slow_link_waits_for_its_allreduce_after_backward():
    profile = hand_made([(1_000_000, 0.02)], backward=0.02)
    link = Link(bytes_per_s=1e6)  # 8 Mbit/s
    step = model.step(profile, link, 2)
    # ring on 2 ranks sends 2(2-1)/2 = 1x the bucket: 1 s, starting when backward produced it at 0.02 s
    assert step.buckets == 1 and step.wire_bytes == 1_000_000
    assert step.seconds == pytest.approx(0.01 + 0.02 + 1.0 + 0.005)
    assert step.compute_seconds == pytest.approx(0.035)
    assert step.exposed_comm_share == pytest.approx(1.0 / 1.035)


def test_a_fast_link_is_compute_bound_and_one_rank_sends_nothing():
    profile = hand_made([(1_000_000, 0.02)], backward=0.02)
    fast = model.step(profile, Link(bytes_per_s=1e12), 2)
    assert fast.seconds == pytest.approx(fast.compute_seconds, rel=1e-4) and fast.exposed_comm_share < 1e-4
    alone = model.step(profile, Link(bytes_per_s=1e3), 1)
    assert alone.seconds == alone.compute_seconds and alone.wire_bytes == 0


def test_many_buckets_overlap_backward_and_queue_one_after_another():
    # three 4 MiB gradients, each its own bucket at a 1 MB cap, ready at 0.1, 0.2 and 0.3 s of a 0.3 s backward
    profile = hand_made([(4 * MB, 0.1), (4 * MB, 0.2), (4 * MB, 0.3)])
    overlapped = model.step(profile, Link(bytes_per_s=4 * MB / 0.05), 2, cap_mb=1)  # 0.05 s per bucket
    assert overlapped.buckets == 3
    assert overlapped.seconds == pytest.approx(0.01 + 0.35 + 0.005)  # only the last bucket sticks out
    queued = model.step(profile, Link(bytes_per_s=4 * MB / 0.2), 2, cap_mb=1)  # 0.2 s per bucket
    assert queued.seconds == pytest.approx(0.01 + 0.7 + 0.005)  # 0.1 -> 0.3 -> 0.5 -> 0.7
    assert queued.comm_seconds == pytest.approx(0.6)
    one = model.step(profile, Link(bytes_per_s=4 * MB / 0.2), 2, cap_mb=100)  # one 12 MiB bucket at 0.3 s
    assert one.buckets == 1 and one.seconds == pytest.approx(0.01 + 0.3 + 0.6 + 0.005)


def test_ring_latency_grows_with_ranks_and_the_bytes_by_2_n_minus_1_over_n():
    link = Link(bytes_per_s=1e9, latency_s=0.002, hop_s=0.001)
    assert link.alpha(4) == pytest.approx(2 * 3 * 0.003)
    assert link.allreduce(1e9, 4) == pytest.approx(0.018 + 2 * 3 / 4)
    assert link.allreduce(1e9, 1) == 0.0
    profile = hand_made([(8_000_000, 0.3)])
    assert model.step(profile, link, 8).wire_bytes == pytest.approx(2 * 7 / 8 * 8_000_000)


def test_ddp_default_buckets_start_with_a_1_mb_one_and_a_cap_applies_to_every_bucket():
    profile = hand_made([(400_000, 0.01), (400_000, 0.02), (400_000, 0.03), (30 * MB, 0.2), (10 * MB, 0.3)])
    default = [sum(g.bytes for g in bucket) for bucket in model.buckets(profile.gradients, None)]
    assert default == [1_200_000, 30 * MB, 10 * MB]  # closed once 1 MiB is reached; then 25 MiB buckets
    capped = [len(bucket) for bucket in model.buckets(profile.gradients, 0.5)]
    assert capped == [2, 2, 1]  # a bucket closes once it reaches the cap, with the gradient that crossed it


def test_what_each_hook_sends():
    conv, bias = Gradient((64, 64, 3, 3), 4, 0.1), Gradient((64,), 4, 0.1)
    bucket = [conv, bias]
    assert model.messages(bucket, "allreduce") == [conv.bytes + bias.bytes]
    assert model.messages(bucket, "fp16") == model.messages(bucket, "bf16") == [(conv.numel + bias.numel) * 2]
    # PowerSGD rank 1: the conv as a 64 x 576 matrix sends P (64) and Q (576); the bias goes uncompressed
    assert model.messages(bucket, "powersgd") == [bias.bytes, 64 * 4, 576 * 4]
    assert model.messages(bucket, "powersgd", powersgd_rank=4) == [bias.bytes, 64 * 4 * 4, 576 * 4 * 4]


def test_powersgd_on_gloo_holds_backward_while_its_chain_runs():
    profile = hand_made([(4 * MB, 0.1), (4 * MB, 0.3)])
    link = Link(bytes_per_s=1e6, hop_s=0.01)
    blocking = model.step(profile, link, 2, "powersgd", cap_mb=1, blocking_powersgd=True)
    free = model.step(profile, link, 2, "powersgd", cap_mb=1, blocking_powersgd=False)
    chain = 3 * link.alpha(2) + (sum(model.messages([profile.gradients[0]], "powersgd"))) / 1e6
    # held: nothing of either chain overlaps the backward pass; free: the first chain runs beside it
    assert blocking.seconds == pytest.approx(profile.compute_seconds + 2 * chain, rel=1e-6)
    assert free.seconds == pytest.approx(0.01 + 0.1 + 2 * chain + 0.005, rel=1e-6)


def test_a_message_the_rank_waits_for_goes_at_the_idle_figures_one_sent_beside_backward_at_the_busy_ones():
    # two 1 MB buckets (a 0.5 MB cap): one ready at 0.1 s of a 0.3 s backward, sent beside it; one ready at its
    # end, which the rank waits for. Beside compute: hop 2 ms, 10 MB/s; alone: hop 1 ms, 20 MB/s
    profile = hand_made([(1_000_000, 0.1), (1_000_000, 0.3)], buffer_bytes=100_000)
    link = Link(bytes_per_s=1e7, hop_s=0.002, idle_hop_s=0.001, idle_bytes_per_s=2e7)
    busy, idle = link.allreduce(1_000_000, 2), link.allreduce(1_000_000, 2, busy=False)
    assert busy == pytest.approx(0.004 + 0.1) and idle == pytest.approx(0.002 + 0.05)
    # the first ends at 0.204 s, within backward; the second starts at its end; the broadcast is waited for
    step = model.step(profile, link, 2, cap_mb=0.5)
    assert step.seconds == pytest.approx(0.01 + (0.001 + 0.005) + 0.3 + idle + 0.005)
    # PowerSGD's chain on gloo holds backward: the rank waits for every one of its allreduces
    chained = Link(bytes_per_s=1e12, hop_s=0.01, chain_hop_s=0.02, idle_chain_hop_s=0.005)
    assert chained.alpha(2, chained=True) == pytest.approx(0.04)
    assert chained.alpha(2, chained=True, busy=False) == pytest.approx(0.01)
    blocking = model.step(hand_made([(4 * MB, 0.3)]), chained, 2, "powersgd", cap_mb=1)
    assert blocking.seconds == pytest.approx(0.315 + 3 * 0.01, rel=1e-4)
    # a link measured before the idle figures were: the busy ones for every message
    old = Link(bytes_per_s=1e7, hop_s=0.002)
    assert old.allreduce(1_000_000, 2, busy=False) == old.allreduce(1_000_000, 2) == pytest.approx(busy)
    assert old.alpha(2, chained=True, busy=False) == old.alpha(2) == pytest.approx(0.004)


def test_compute_slowdown_stretches_backward_by_the_bytes_sent_while_it_computes():
    # a 1 MB bucket ready a third into backward, sent at once: its bytes cost backward 1e6 x 1e-7 s
    early = hand_made([(1_000_000, 0.1), (4, 0.3)])
    fast = Link(bytes_per_s=1e12, slowdown_s_per_byte=1e-7)
    assert model.step(early, fast, 2, cap_mb=0.5).seconds == pytest.approx(0.01 + 0.3 + 0.1 + 0.005, rel=1e-4)
    # the same bucket ready as backward ends: nothing computes while it is sent, nothing is slowed
    late = hand_made([(1_000_000, 0.3)])
    assert model.step(late, fast, 2).seconds == pytest.approx(0.01 + 0.3 + 0.005, rel=1e-4)
    # sent at 10 MB/s from 0.25 s of a 0.3 s backward: the first half of its bytes overlap backward, which
    # stretches it and so the share; settled, about 55 % (half, and what the stretch adds)
    midway = hand_made([(1_000_000, 0.25), (4, 0.3)])
    slowly = Link(bytes_per_s=1e7, slowdown_s_per_byte=1e-7)
    stretched = model.step(midway, slowly, 2, cap_mb=0.5).seconds - model.step(midway, Link(1e7), 2, cap_mb=0.5).seconds
    assert 0.04 < stretched < 0.07


def test_a_shapers_bucket_sends_the_first_bytes_after_a_pause_at_the_line_rate():
    # one 1 MB bucket per step at 1 MB/s after 0.3 s of backward: the shaper's 100 kB bucket refills during the
    # step's 0.315 s of compute (0.315 MB at 1 MB/s, capped at 100 kB), so 100 kB of each message go at the line
    profile = hand_made([(1_000_000, 0.3)])
    plain = Link(bytes_per_s=1e6)
    shaped = Link(bytes_per_s=1e6, burst_bytes=100_000, line_bytes_per_s=1e8)
    assert model.step(profile, plain, 2).seconds == pytest.approx(0.315 + 1.0)
    assert model.step(profile, shaped, 2).seconds == pytest.approx(0.315 + 0.9 + 100_000 / 1e8)
    # a bucket the size of the burst goes at the line rate; back-to-back messages leave no time to refill
    small = hand_made([(100_000, 0.3)])
    assert model.step(small, shaped, 2).seconds == pytest.approx(0.315 + 100_000 / 1e8)
    chained = hand_made([(100_000, 0.3), (100_000, 0.3)])
    assert model.step(chained, shaped, 2, cap_mb=0.05).seconds == pytest.approx(0.315 + 0.001 + 0.1)
    assert shaped.allreduce(1_000_000, 2) == plain.allreduce(1_000_000, 2)  # no tokens given: the rate


def test_a_message_begun_while_backward_computes_slows_it():
    # five tiny buckets (a 1 KiB cap: one gradient each), ready every 2 ms of a 10 ms backward; α is 2 hops of
    # 2 ms on 2 ranks, so they queue: 2 -> 6 -> 10 -> 14 -> 18 -> 22 ms
    profile = hand_made([(2000, 0.002 * (i + 1)) for i in range(5)], forward=0.0, backward=0.01, optimizer=0.0)
    plain = Link(bytes_per_s=1e12, hop_s=0.002)
    assert model.step(profile, plain, 2, cap_mb=0.001).seconds == pytest.approx(0.002 + 5 * 0.004)
    # each message begun before backward ends costs it 1 ms of compute: the two begun at 2 and 6 ms stretch it
    # to 12 ms, so the third (now at 10.4 ms) begins before its end too; three stretch it to 13 ms, where the
    # schedule settles: ready times x 1.3, the first message at 2.6 ms, then five of 4 ms back to back
    slowed = Link(bytes_per_s=1e12, hop_s=0.002, slowdown_s_per_message=0.001)
    assert model.step(profile, slowed, 2, cap_mb=0.001).seconds == pytest.approx(0.0026 + 5 * 0.004)


def test_the_ranks_wait_for_the_slowest_one_at_every_step():
    profile = hand_made([(1_000, 0.3)], step_stdev_s=0.01)
    fast = Link(bytes_per_s=1e12)
    assert model.step(profile, fast, 1).seconds == pytest.approx(0.315)  # one rank waits for nobody
    two, sixteen = model.step(profile, fast, 2).seconds, model.step(profile, fast, 16).seconds
    assert two == pytest.approx(0.315 + 0.01 * model.slowest_of(2), rel=1e-6)
    # the expected largest of n standard normals: 0.56 for 2, 1.03 for 4, 1.77 for 16 (tables); Blom's
    # approximation is within 0.03 of each
    for n, expected in ((2, 0.5642), (4, 1.0294), (16, 1.7660)):
        assert model.slowest_of(n) == pytest.approx(expected, abs=0.03)
    assert sixteen > two and model.slowest_of(1) == 0.0


def test_the_ranks_jitter_is_not_a_pause_of_the_whole_machine():
    from distcnn.forecast.profile import robust_stdev

    # steps of 100 ms ± 2 ms (a normal spread: standard deviation 2 ms), then 5 of 60 in which the machine
    # stalled: a plain standard deviation is 9x the jitter, the robust one within a third of it
    steps = [0.1 + 0.002 * NormalDist().inv_cdf((i + 0.5) / 55) for i in range(55)]
    stalled = steps + [0.16] * 5
    assert statistics.pstdev(stalled) > 0.015
    assert robust_stdev(stalled) == pytest.approx(0.002, rel=0.35)
    assert robust_stdev([0.1] * 10) == 0.0


def test_the_recommended_cap_is_never_slower_than_the_default():
    profile = hand_made([(2 * MB, 0.05 * i) for i in range(1, 7)])
    link = Link(bytes_per_s=2 * MB / 0.04)
    cap, best = model.best_cap(profile, link, 2, "allreduce")
    default = model.step(profile, link, 2).seconds
    assert best.seconds <= default * (1 - model.MIN_CAP_GAIN)
    assert cap is not None and cap < 25  # small buckets overlap the backward here
    # one bucket's worth of gradients, ready at the end of backward: no cap overlaps anything, none is better
    one = hand_made([(2 * MB, 0.3)])
    assert model.best_cap(one, link, 2, "allreduce") == (None, model.step(one, link, 2))
    # a gain smaller than the forecast's own error is no reason to change DDP's default
    assert model.best_cap(profile, link, 2, "allreduce", min_gain=0.99)[0] is None


def test_rows_scale_over_nodes_with_epoch_time_and_cost():
    profile = hand_made([(4 * MB, 0.3)], train_images=10_000, eval_seconds=2.0)
    sweep = plan.Sweep([1, 2, 4], [1e9], 0.0, 1, ["allreduce", "fp16"], None, epochs=3, price_per_node_hour=2.0)
    rows = plan.rows(profile, sweep)
    assert [(row["nodes"], row["comm_hook"]) for row in rows] == [
        (1, "allreduce"), (2, "allreduce"), (4, "allreduce"), (1, "fp16"), (2, "fp16"), (4, "fp16")]
    one, four = rows[0], rows[2]
    assert one["scaling_efficiency"] == 1.0 and 0 < four["scaling_efficiency"] < 1
    assert four["steps_per_epoch"] == math.ceil(2500 / 32)
    assert four["epoch_seconds"] == pytest.approx(four["steps_per_epoch"] * four["step_seconds"] + 2.0 / 4)
    assert four["cost"] == pytest.approx(4 * 3 * four["epoch_seconds"] / 3600 * 2.0)
    assert rows[5]["wire_bytes_per_step"] == pytest.approx(rows[2]["wire_bytes_per_step"] / 2)
    for key in ("nodes", "ranks_per_node", "bandwidth_bits_per_s", "latency_s", "comm_hook", "bucket_cap_mb",
                "step_seconds", "images_per_second", "scaling_efficiency", "exposed_comm_share",
                "wire_bytes_per_step"):
        assert key in one
    assert "uncalibrated" in one["link"]


def test_a_calibration_fit_recovers_alpha_and_bandwidth(tmp_path):
    points = [[size, 0.0008 + size / 5e7] for size in (4096, 65536, 1 << 20, 1 << 24)]
    alpha, effective = links.fit(points, 2)
    assert alpha == pytest.approx(0.0008, rel=1e-3) and effective == pytest.approx(5e7, rel=1e-3)
    entry = links.Calibrated(1e9, 0.0, alpha, effective, 1e-9, 2, points)
    profile = links.LinkProfile("emulated", "gloo", "inter", ["h1", "h2"], [entry], str(tmp_path / "l.json"))
    profile.write(tmp_path / "l.json")
    back = links.read(tmp_path / "l.json")
    link, how = back.link(1e8, 0.001)  # another rate: the 1gbit share, 40 %, and the hop from α = 2 hops
    assert link.bytes_per_s == pytest.approx(0.4 * 1e8 / 8) and link.hop_s == pytest.approx(0.0004)
    assert link.latency_s == 0.001 and "share of the 1gbit" in how
    assert link.burst_bytes == 0.0 and link.line_bytes_per_s == math.inf  # no shaper recorded, none uncapped
    assert link.idle_hop_s is None and link.idle_bytes_per_s is None  # not measured: the busy figures hold
    # timed alone too: α 0.4 ms (hop 0.2 ms) and 60 % of the rate, carried to another rate as the busy share is
    idle = links.Calibrated(1e9, 0.0, alpha, effective, 1e-9, 2, points, 0.006, 0.0, 0.0, 0.0004, 7.5e7,
                            points, 0.003)
    links.LinkProfile("emulated", "gloo", "inter", ["h1", "h2"], [idle], "").write(tmp_path / "idle.json")
    measured, _ = links.read(tmp_path / "idle.json").link(1e8, 0.0)
    assert measured.idle_hop_s == pytest.approx(0.0002) and measured.idle_bytes_per_s == pytest.approx(0.6 * 1e8 / 8)
    assert measured.chain_hop_s == pytest.approx(0.001) and measured.idle_chain_hop_s == pytest.approx(0.0005)


def test_a_shapers_bucket_is_read_from_the_hosts_caps_and_kept_in_the_link_profile(tmp_path):
    assert links.shaper_burst("tbf rate 10Mbit burst 64Kb lat 100ms") == 65536
    assert links.shaper_burst("tbf rate 1Gbit burst 500000b lat 100ms; netem delay 1ms") == 500_000
    assert links.shaper_burst("tbf rate 1Gbit burst 4Mb lat 100ms") == 4 * MB
    assert links.shaper_burst("netem delay 1ms") == links.shaper_burst("none") == 0.0
    capped = links.Calibrated(1e7, 0.0, 1e-3, 1.1e6, 1e-9, 2, [[4096, 5e-3]], None, 65536)
    uncapped = links.Calibrated(None, 0.0, 1e-3, 3e8, 1e-9, 2, [[4096, 1e-3]])
    links.LinkProfile("emulated", "gloo", "inter", ["h1", "h2"], [capped, uncapped], "").write(tmp_path / "l.json")
    back = links.read(tmp_path / "l.json")
    shaped, _ = back.link(1e7, 0.0)
    assert shaped.burst_bytes == 65536 and shaped.line_bytes_per_s == 3e8  # tokens go at the uncapped B_eff
    assert back.link(None, 0.0)[0].burst_bytes == 0.0  # no shaper on an uncapped link


def test_the_compute_lost_per_message_is_the_median_of_every_links_measurement(tmp_path):
    # a 4 KiB message is not slowed by any cap: each link measured the same host figure once, one of them far off
    entries = [links.Calibrated(rate, 0.0, 1e-3, share * (rate or 8e9) / 8, 1e-9, 2, [[4096, 1e-3]], None, 0.0, lost)
               for rate, share, lost in ((1e7, 0.9, 0.0015), (1e9, 0.8, 0.0018), (None, 1.0, 0.0061))]
    profile = links.LinkProfile("emulated", "gloo", "inter", ["h1", "h2"], entries, "")
    assert profile.fastest.slowdown_s_per_message == 0.0061  # the uncapped link's alone would be the outlier
    assert profile.slowdown_s_per_message == 0.0018
    assert all(profile.link(rate, 0.0)[0].slowdown_s_per_message == 0.0018 for rate in (1e7, 1e8, None))


def test_bad_forecast_input_is_one_line(tmp_path, capsys):
    assert "--bandwidth '10mbps'" in usage_error(capsys, "forecast", "--bandwidth", "10mbps")
    assert "nodes must be at least 1" in usage_error(capsys, "forecast", "--nodes", "0,2")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    assert "not a finished run" in usage_error(capsys, "forecast", "--from", str(unfinished))
    assert "no such run directory" in usage_error(capsys, "forecast", "--from", str(tmp_path / "missing"))
    entry = links.Calibrated(None, 0.0, 1e-4, 1e9, 0.0, 2, [[4096, 1e-4]])
    links.LinkProfile("emulated", "gloo", "inter", ["h1", "h2"], [entry], "").write(tmp_path / "emulated.json")
    assert "calibrated on emulated hosts" in usage_error(
        capsys, "forecast", "--link-profile", str(tmp_path / "emulated.json"))
    (tmp_path / "junk.json").write_text("{not json")
    assert "not a link profile" in usage_error(capsys, "forecast", "--link-profile", str(tmp_path / "junk.json"))
    assert "unknown comm hook" in usage_error(capsys, "forecast", "--comm-hooks", "allreduce,fp8")
    assert "--reference-runs must be at least 1" in usage_error(
        capsys, "forecast", "--calibrate", "--reference-runs", "0", "--nproc-per-node", "2")
    assert "--profile-seconds must be above 0" in usage_error(capsys, "study", "--forecast-only",
                                                               "--profile-seconds", "0")
    assert "uncapped" in usage_error(capsys, "forecast", "--bandwidth", "none", "--nodes", "2",
                                     "--data", "synthetic:n=300", "--model", "lenet")


@pytest.mark.slow
def test_the_profile_of_a_real_configuration_matches_what_ddp_and_the_hooks_do():
    from distcnn.config import make_config
    from distcnn.forecast.profile import profile

    config = make_config({"model": "simplecnn", "data": "synthetic:n=2000,test=64", "batch_size": 32,
                          "bucket_cap_mb": 0.05})
    started = time.perf_counter()
    profiled = profile(config, threads=1, quiet=True, main_seconds=0.5, hook_seconds=0.5)
    assert time.perf_counter() - started < 60
    prof, meta = profiled.profile, profiled.meta
    groups = model.buckets(prof.gradients, 0.05)
    assert len(groups) > 1  # the small cap split the gradients
    for hook in model.HOOKS:  # the model's message sizes are what the hooks handed to the collective
        assert sum(sum(model.messages(b, hook)) for b in groups) == meta["counted_bytes_per_step"][hook], hook
    readiness = [g.ready_s for g in prof.gradients]
    assert readiness == sorted(readiness) and 0 < readiness[-1] <= prof.phases["backward"] * 1.5
    assert all(prof.phases[phase] > 0 for phase in ("forward", "backward", "optimizer"))
    assert meta["warmup_seconds"] > 0 and prof.buffer_bytes > 0  # BatchNorm's running statistics
    # every hook's own compute is measured, allreduce's being the reference; its size is not asserted here:
    # PowerSGD's is about 2.4 ms a step above allreduce's on an idle machine, while on a loaded one a step's
    # time in a hook on a process group of one is mostly the wait for gloo's thread to be scheduled (17 ms once
    # in allreduce's least step); the timing itself is checked below, with a hook whose time is known
    assert set(prof.hook_compute) == set(model.HOOKS) and prof.hook_compute["allreduce"] == 0.0
    assert all(math.isfinite(seconds) for seconds in prof.hook_compute.values())


def test_a_hooks_time_is_counted_until_its_future_is_done():
    import threading

    import torch

    from distcnn.forecast.profile import _timed

    def hook(state, bucket):  # its work done in a callback on another thread, as PowerSGD's chain is
        future = torch.futures.Future()
        threading.Timer(0.03, lambda: future.set_result(bucket * 2)).start()
        return future

    inside = [0.0]
    timed = _timed(hook, inside)
    assert torch.equal(timed(None, torch.ones(3)).wait(), torch.full((3,), 2.0))
    assert timed(None, torch.ones(3)).wait().sum() == 6
    assert 0.06 <= inside[0] < 5  # two calls of at least 30 ms each; a timer can only be late


@pytest.mark.slow
def test_a_forecast_from_a_finished_one_rank_run(tiny_study, capsys):
    from helpers import cli

    run_dir = next(path for path in (tiny_study / "runs").iterdir() if (path / "gradients.json").exists())
    code, out, err = cli(capsys, "forecast", "--from", str(run_dir), "--nodes", "1,2,4", "--bandwidth",
                         "100mbit,1gbit", "--comm-hooks", "allreduce,fp16", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 2 * 2 * 3 and {row["profile"] for row in rows} == {f"run {run_dir}"}
    summary = json.loads((run_dir / "summary.json").read_text())
    one = [row for row in rows if row["nodes"] == 1][0]
    assert one["step_seconds"] == pytest.approx(summary["step_seconds_steady"], rel=0.35)  # its steady steps
    slow, fast = ([row for row in rows if row["nodes"] == 4 and row["comm_hook"] == "allreduce"
                   and row["bandwidth_bits_per_s"] == rate][0] for rate in (1e8, 1e9))
    assert slow["step_seconds"] > fast["step_seconds"] and slow["exposed_comm_share"] > fast["exposed_comm_share"]


@pytest.mark.slow
def test_check_needs_a_measured_link_for_ranks_of_one_machine(two_rank_run, capsys):
    run_dir, _ = two_rank_run
    assert "--intra-profile" in usage_error(capsys, "forecast", "--check", str(run_dir))


@pytest.mark.slow
def test_a_study_is_forecast_first_and_its_report_sets_forecast_beside_measured(tiny_study, tmp_path):
    from helpers import STUDY_FILE, copy_study, written_report

    study = copy_study(tiny_study, tmp_path)
    done = run_cli("study", str(tiny_study.parent / STUDY_FILE), "--out", str(study), "--forecast-only",
                   "--profile-seconds", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "forecast of study" in done.stdout and "node-hours" in done.stdout
    rows = json.loads((study / "forecast.json").read_text())["rows"]
    assert len(rows) == 4 and all(row["step_seconds"] > 0 and row["train_seconds"] > 0 for row in rows)
    html, markdown = written_report(study)
    assert "Forecast beside measured" in markdown
    section = markdown.split("Forecast beside measured", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| policy=")]
    assert len(rows) == 4 * 3  # each configuration: step, images/s, training seconds
    assert all(line.rstrip(" |").endswith("%") for line in rows)  # each with its error


@pytest.mark.slow
@pytest.mark.emulated_cluster
def test_a_real_two_host_run_is_checked_against_its_forecast_over_a_calibrated_link(tmp_path, two_host_run,
                                                                                    capsys):
    from test_cluster import distcnn_namespaces

    from distcnn.ownership import PARENT_ENV

    assert run_cli("cluster", "up", "--hosts", "2").returncode == 0
    try:
        link_file = tmp_path / "link.json"
        calibrated = run_cli("forecast", "--calibrate", "--cluster", "emulated", "--nnodes", "2", "--bandwidth",
                             TWO_HOSTS_RATE, "--link-profile", str(link_file), "--model", "lenet", "--batch-size",
                             "32", "--data", "synthetic:n=1000,test=64", "--profile-seconds", "1",
                             "--reference-runs", "1", timeout=300,
                             env={PARENT_ENV: str(os.getpid())})  # as an in-process launch leaves it: stale
        assert calibrated.returncode == 0, calibrated.stderr[-3000:]
        entry = json.loads(link_file.read_text())["entries"][0]
        assert entry["rate_bits"] == 1e9 and entry["alpha_s"] > 0 and 0.2 < entry["share"] < 1.5
        assert len(entry["points"]) >= 5 and entry["powersgd_bucket_s"] > 0
        # the same buckets timed alone too (what a bucket the rank waits for costs)
        assert [size for size, _ in entry["idle_points"]] == [size for size, _ in entry["points"]]
        assert entry["idle_alpha_s"] > 0 and entry["idle_bytes_per_s"] > 0 and entry["powersgd_bucket_idle_s"] > 0
        fitted = json.loads(link_file.read_text())
        assert 0.25 < fitted["compute_factor"] < 4 and fitted["reference"]["model"] == "lenet"
        assert [run["compute_factor"] for run in fitted["reference"]["runs"]] == [fitted["compute_factor"]]
        # a 2-node job on hosts capped at that rate (conftest.py): the check reads the cap from its cluster.json
        checked = run_cli("forecast", "--check", str(two_host_run), "--link-profile", str(link_file), "--json",
                          "--profile-seconds", "1", timeout=300)
        assert checked.returncode == 0, checked.stderr[-3000:]
        result = json.loads(checked.stdout)
        assert result["nodes"] == 2 and result["bandwidth_bits_per_s"] == 1e9 and result["link"] == "calibrated"
        # how accurate the forecast is, is the benchmark's to measure (a test beside other work is no measure of
        # it: loaded, this one measured 55 % over): here, that the check compares what it says it compares
        measured, predicted = result["measured_step_seconds"], result["predicted_step_seconds"]
        assert measured > 0 and predicted > 0 and result["error"] == pytest.approx(predicted / measured - 1)
        assert 0.25 < predicted / measured < 4
        wrong_kind = usage_error(capsys, "forecast", "--link-profile", str(link_file), "--nodes", "2")
        assert "calibrated on emulated hosts" in wrong_kind
    finally:
        run_cli("cluster", "down")
        assert distcnn_namespaces() == []

