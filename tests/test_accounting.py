"""Accounting on real runs: exact gradient bytes under each DDP hook, per-rank series, loopback traffic,
the step-time breakdown, and null (never 0) for a counter this machine lacks."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from distcnn.config import make_config
from distcnn.launch import run
from distcnn.models import create_model
from distcnn.telemetry.counters import Rapl
from distcnn.record import read_rows
from helpers import TWO_RANKS, read_summary, run_cli

RESOURCE_FIELDS = ("cpu_percent_mean", "process_cpu_percent_mean", "mem_percent_mean", "rss_peak_bytes",
                   "net_packets_per_s_mean", "net_bytes_total", "achieved_flops_per_s")


def gradient_bytes_of_simplecnn() -> int:
    """Computed here, independently of the run: every parameter's gradient is a float32 tensor."""
    model = create_model("simplecnn", in_chans=1, num_classes=10)
    return sum(p.numel() * 4 for p in model.parameters())


def epochs(run_dir) -> list[dict]:
    with open(run_dir / "epochs.csv") as handle:
        return list(csv.DictReader(handle))


def two_rank_run(out, *args):
    result = run_cli("train", *TWO_RANKS, "--out", str(out), *args, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return read_summary(out)


@pytest.fixture
def allreduce_run(two_rank_run):
    return two_rank_run


@pytest.mark.slow
def test_allreduce_hands_over_exactly_the_gradient_bytes_every_step(allreduce_run):
    out, summary = allreduce_run
    grads = gradient_bytes_of_simplecnn()
    assert summary["gradient_bytes"] == grads
    assert summary["comm_hook"] == "allreduce"
    assert summary["comm_bytes_per_step"] == grads
    rows = epochs(out)
    for row in rows:  # every rank, every step of the epoch: nothing more, nothing less
        assert int(row["comm_bytes"]) == int(row["steps"]) * 2 * grads
    assert summary["comm_bytes_total"] == sum(int(r["comm_bytes"]) for r in rows)
    assert summary["comm_ring_bytes_per_step_formula"] == grads  # 2(N-1)/N with N = 2
    assert summary["ddp_comm_seconds_mean"] > 0, "DDP's own timer of its allreduce"


@pytest.mark.slow
def test_each_rank_has_an_increasing_series_with_cpu_use_while_training(allreduce_run):
    out, _ = allreduce_run
    for rank in (0, 1):
        rows, header = read_rows(out / "telemetry" / f"rank{rank}.csv")
        times = [row["time"] for row in rows]
        assert len(rows) >= 5 and all(b > a for a, b in zip(times, times[1:]))
        train = [row for row in rows if row["phase"] == "train"]
        assert train and all(row["rank"] == rank for row in rows)
        assert max(row["process_cpu_percent"] for row in train) > 0
        assert sum(row["interval_s"] for row in train) > 0
        host_level = [row["net_packets_per_s"] for row in rows if row["net_packets_per_s"] is not None]
        assert bool(host_level) == (rank == 0), "host figures come from local rank 0 only: counted once"


@pytest.mark.slow
@pytest.mark.alone  # the loopback's counters count every process's traffic: nothing else may talk over it
def test_two_local_ranks_talk_over_loopback_at_least_the_ring_bytes(allreduce_run):
    """Gloo's allreduce of N = 2 ranks sends each rank's whole buffer once (half reduce-scatter, half
    all-gather): the loopback interface must carry at least that, and not much more than headers add."""
    _, summary = allreduce_run
    assert summary["net_packets_per_s_mean"] > 0
    (host,) = summary["hosts"].values()
    assert "lo" in host["net_interfaces"] and host["ranks"] == [0, 1]
    loopback = host["interfaces"]["lo"]
    assert loopback["tx_packets"] > 0
    ring_total = summary["comm_ring_bytes_per_step_formula"] * summary["comm_bytes_total"] / summary[
        "comm_bytes_per_step"]
    assert 0.99 * ring_total <= loopback["tx_bytes"] <= 1.5 * ring_total


@pytest.mark.slow
def test_show_prints_and_draws_a_real_run(allreduce_run):
    out, summary = allreduce_run
    result = run_cli("show", str(out))
    assert result.returncode == 0, result.stderr
    assert f"{summary['test_accuracy']:.4f}" in result.stdout and "allreduce" in result.stdout
    assert (out / "telemetry.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("hook", ["fp16", "bf16"])
@pytest.mark.slow
def test_half_precision_hooks_hand_over_half_the_gradient_bytes(tmp_path, hook):
    summary = two_rank_run(tmp_path / hook, "--comm-hook", hook)
    assert summary["comm_hook"] == hook
    assert summary["comm_bytes_per_step"] * 2 == gradient_bytes_of_simplecnn()
    assert summary["test_accuracy"] > 0.3, "still learns (chance is 0.1)"


@pytest.mark.slow
def test_powersgd_hands_over_less_after_its_first_uncompressed_step_in_each_of_several_buckets(tmp_path):
    """With several DDP buckets, torch's PowerSGD issues collectives from callback threads in an order that
    differs between ranks, and gloo aborts (size mismatch) unless the buckets go one at a time: 50 kB buckets
    give simplecnn's gradients several, as resnet18's 45 MB fill several of DDP's default 25 MB."""
    out = tmp_path / "powersgd"
    summary = two_rank_run(out, "--comm-hook", "powersgd", "--bucket-cap-mb", "0.05")
    grads = gradient_bytes_of_simplecnn()
    rows = epochs(out)
    first, second = (int(r["comm_bytes"]) / (2 * int(r["steps"])) for r in rows)
    assert float(rows[1]["comm_calls_per_step"]) >= 3 * 3, "three allreduces per bucket, in three buckets or more"
    assert second < grads / 4, "compressed: low-rank factors instead of whole gradients"
    assert second < first < grads, "epoch 1 holds the uncompressed first step"
    assert summary["test_accuracy"] > 0.2


def one_rank_config(tmp_path, **options):
    base = {"data": "synthetic:n=600", "epochs": 2, "batch_size": 32, "threads": 2, "sample_interval": 0.1,
            "out": str(tmp_path / "run")}
    return make_config(base | options)


def test_phases_add_up_to_the_measured_epoch_time(tmp_path):
    summary = run(one_rank_config(tmp_path))
    for row in epochs(tmp_path / "run"):
        steps, train_seconds = int(row["steps"]), float(row["train_seconds"])
        phases = sum(float(row[f"{p}_mean_s"]) for p in ("data_wait", "augmentation", "forward", "backward",
                                                         "optimizer"))
        assert phases == pytest.approx(float(row["step_mean_s"]), rel=1e-6)
        assert steps * phases == pytest.approx(train_seconds, rel=0.05)
        assert float(row["step_p95_s"]) >= float(row["step_mean_s"]) * 0.5
    breakdown = summary["step_time_breakdown"]
    assert set(breakdown) == {"data_wait", "augmentation", "forward", "backward", "optimizer", "step"}
    assert breakdown["forward"] > 0 and breakdown["backward"] > 0
    # One rank: nothing is communicated (0 is measured, not missing), and no hook is in play.
    assert summary["comm_bytes_total"] == 0 and summary["comm_hook"] is None
    assert summary["achieved_flops_per_s"] == pytest.approx(
        summary["train_flops_per_image"] * summary["images_seen"] / summary["train_seconds"])


def test_a_counter_missing_on_this_machine_is_null_not_zero(tmp_path):
    summary = run(one_rank_config(tmp_path, epochs=1))
    has_gpu = torch.cuda.is_available()
    has_rapl = Rapl().available
    assert (summary["gpu_util_percent_mean"] is None) == (not has_gpu)
    assert (summary["energy_joules"] is None) == (not (has_gpu or has_rapl))
    (host,) = summary["hosts"].values()
    assert (host["cpu_energy_joules"] is None) == (not has_rapl)
    if not has_gpu:
        header = (tmp_path / "run" / "telemetry" / "rank0.csv").read_text().splitlines()[0].split(",")
        rows, _ = read_rows(tmp_path / "run" / "telemetry" / "rank0.csv")
        assert "gpu_util_percent" in header and all(row["gpu_util_percent"] is None for row in rows)
    for field in RESOURCE_FIELDS:
        assert summary[field] is not None, field


def test_telemetry_off_measures_nothing_and_says_so(tmp_path):
    summary = run(one_rank_config(tmp_path, epochs=1, telemetry="off"))
    assert summary["telemetry"] == "off"
    assert not (tmp_path / "run" / "telemetry").exists()
    for field in ("cpu_percent_mean", "net_packets_per_s_mean", "step_time_breakdown", "comm_bytes_per_step",
                  "warmup_seconds", "step_seconds_steady"):
        assert summary[field] is None, field
    assert not (tmp_path / "run" / "gradients.json").exists(), "no backward pass timed"
    assert summary["test_accuracy"] > 0.3
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
