"""The resource sampler and the step timer in isolation: what they record, and that totals are exact."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from distcnn.telemetry.counters import run_interfaces
from distcnn.telemetry.resources import combine_ranks
from distcnn.record import read_rows
from distcnn.telemetry.sampler import ResourceSampler
from distcnn.telemetry.steps import PHASES, StepTimer, epoch_figures, run_breakdown


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


def send_udp_to_loopback(packets: int, size: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        receiver.bind(("127.0.0.1", 0))
        for _ in range(packets):
            sender.sendto(b"x" * size, receiver.getsockname())
            receiver.recv(size)


def sampler(path, **options) -> ResourceSampler:
    settings = {"rank": 0, "local_rank": 0, "host_level": True, "run_interfaces": ["lo"]} | options
    return ResourceSampler(path, 0.05, **settings)


def test_phases_split_the_series_and_totals_are_exact(tmp_path):
    path = tmp_path / "rank0.csv"
    s = sampler(path).start()
    # each phase change bracketed by clocks read before and after it: on a busy machine this process can wait
    # for a core between a phase change and the next clock reading
    before = time.time(), time.process_time()
    s.set_phase("train", 1)
    after = time.time(), time.process_time()
    busy(0.4)
    send_udp_to_loopback(packets=200, size=1000)
    before_eval = time.time(), time.process_time()
    s.set_phase("eval", 1)
    after_eval = time.time(), time.process_time()
    time.sleep(0.15)
    s.stop()
    rows, header = read_rows(path)
    assert len(rows) == len(s.rows), "the file holds every sample taken"
    times = [row["time"] for row in rows]
    assert all(b > a for a, b in zip(times, times[1:]))
    train = [row for row in rows if row["phase"] == "train"]
    assert {row["epoch"] for row in train} == {1}
    figures = s.summary("train")
    # no interval straddles a phase change (1 ms: the sampler's own clock readings)
    assert before_eval[0] - after[0] - 0.001 <= figures["seconds"] <= after_eval[0] - before[0] + 0.001
    # the CPU the process used in the phase (all its threads, the sampler's too), whatever share of a core the
    # machine gave it (on a busy machine, a third): the counters tick every 10 ms, read at both ends
    assert before_eval[1] - after[1] - 0.03 <= figures["cpu_seconds"] <= after_eval[1] - before[1] + 0.03
    assert figures["cpu_seconds"] == pytest.approx(figures["seconds"] * figures["process_cpu_percent_mean"] / 100)
    loopback = figures["interfaces"]["lo"]
    assert loopback["tx_packets"] >= 200 and loopback["tx_bytes"] >= 200 * 1000
    assert figures["net_packets_total"] >= 400, "loopback counts each packet sent and received"
    assert s.summary("eval")["seconds"] > 0.1


def test_an_unavailable_counter_is_an_empty_cell_and_none_in_the_summary(tmp_path):
    s = sampler(tmp_path / "rank1.csv", rank=1, local_rank=1, host_level=False).start()
    s.set_phase("train", 1)
    busy(0.15)
    s.set_phase("eval", 1)
    s.stop()
    rows, header = read_rows(tmp_path / "rank1.csv")
    assert "net_packets_per_s" in header and all(row["net_packets_per_s"] is None for row in rows)
    figures = s.summary("train")
    assert "net_bytes_total" not in figures, "not host level: its network figures belong to local rank 0"
    if not torch.cuda.is_available():
        assert figures["gpu_util_percent_mean"] is None and figures["gpu_energy_joules"] is None
    combined = combine_ranks([figures])
    assert combined["net_packets_per_s_mean"] is None and combined["hosts"] == {}
    assert combined["process_cpu_percent_mean"] > 0


def test_a_resumed_rank_keeps_the_earlier_series_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "rank0.csv"
    first = sampler(path).start()
    first.set_phase("train", 1)
    busy(0.2)
    first.set_phase("eval", 1)
    first.stop()
    earlier = len(first.rows)
    with open(path, "a") as handle:
        handle.write("1795000000.5,0.1,0.05,tra")  # a rank killed in the middle of a line
    second = sampler(path)
    assert len(second.rows) == earlier
    second.start()
    second.set_phase("train", 2)
    busy(0.2)
    second.set_phase("eval", 2)
    second.stop()
    rows, _ = read_rows(path)
    assert len(rows) == len(second.rows) > earlier
    assert {row["epoch"] for row in rows if row["phase"] == "train"} == {1, 2}
    assert second.summary("train")["seconds"] == pytest.approx(
        first.summary("train")["seconds"] + second.summary("train", epoch=2)["seconds"])


def test_combine_keeps_hosts_apart_and_sums_their_traffic():
    def rank(r, host, local, packets):
        figures = {"rank": r, "local_rank": local, "host": host, "host_level": local == 0,
                   "process_cpu_percent_mean": 50.0, "cpu_seconds": 2.0, "rss_peak_bytes": 100 + r,
                   "system_cpu_percent_mean": 60.0, "system_mem_percent_mean": 10.0, "gpu_util_percent_mean": None,
                   "gpu_memory_peak_bytes": None, "gpu_energy_joules": None, "energy_sources": []}
        if local == 0:
            figures |= {"net_interfaces": ["eth0"], "net_bytes_total": 10.0 * packets, "net_packets_total": packets,
                        "net_bytes_per_s_mean": 5.0 * packets, "net_packets_per_s_mean": packets / 2,
                        "interfaces": {}, "cpu_energy_joules": None}
        return figures

    combined = combine_ranks([rank(0, "a", 0, 100), rank(1, "a", 1, 0), rank(2, "b", 0, 300), rank(3, "b", 1, 0)])
    assert combined["hosts"]["a"]["ranks"] == [0, 1] and combined["hosts"]["b"]["ranks"] == [2, 3]
    assert combined["net_packets_per_s_mean"] == 200 and combined["net_bytes_total"] == 4000
    assert combined["cpu_seconds_total"] == 8.0 and combined["rss_peak_bytes"] == 103
    assert combined["energy_joules"] is None and combined["gpu_util_percent_mean"] is None


def test_run_interfaces_are_loopback_for_ranks_of_one_host():
    assert run_interfaces("127.0.0.1", local_world_size=2, world_size=2) == ["lo"]
    assert "lo" not in run_interfaces(None, local_world_size=1, world_size=1)


def test_step_phases_are_contiguous_and_add_up_to_the_wall_time():
    timer = StepTimer(torch.device("cpu"))
    started = time.perf_counter()
    timer.start()
    for _ in range(3):
        for phase, seconds in zip(PHASES, (0.002, 0.001, 0.004, 0.006, 0.001)):
            time.sleep(seconds)
            timer.mark(phase)
        timer.end_step()
    wall = time.perf_counter() - started
    steps = timer.finish()
    assert len(steps) == 3 and all(set(step) == set(PHASES) for step in steps)
    assert sum(sum(step.values()) for step in steps) == pytest.approx(wall, rel=0.02)
    assert all(step["backward"] >= 0.006 for step in steps)
    figures = epoch_figures(steps)
    assert figures["steps"] == 3 and figures["step_mean_s"] == pytest.approx(wall / 3, rel=0.02)
    history = [figures | {"steps": 3}, figures | {"steps": 1}]
    assert run_breakdown(history)["backward"] == pytest.approx(figures["backward_mean_s"])
