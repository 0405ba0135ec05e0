"""`distcnn show`: a fake run record in, a table with n/a for what is missing and a real PNG out."""

from __future__ import annotations

import csv
import io
import json

from helpers import run_cli, usage_error
from distcnn.record import read_series

HOST = "node-a"
COLUMNS = ["time", "elapsed_s", "interval_s", "phase", "epoch", "host", "rank", "local_rank",
           "process_cpu_percent", "process_cpu_seconds", "rss_bytes", "rss_peak_bytes", "system_cpu_percent",
           "system_mem_percent", "net_bytes_per_s", "net_packets_per_s"]
ETH0 = [f"net.eth0.{field}" for field in ("rx_bytes_per_s", "tx_bytes_per_s", "rx_packets_per_s", "tx_packets_per_s")]
TAIL = ["cpu_energy_joules", "cpu_power_watts", "gpu_util_percent", "gpu_memory_used_bytes", "gpu_power_watts",
        "gpu_energy_joules"]
PHASES = ["setup", "train", "train", "eval", "train", "train", "eval", "finish"]
SUMMARY = {
    "name": "fake-run", "model": "resnet18", "policy": "paper", "data": "synthetic", "world_size": 2,
    "test_accuracy": 0.8765, "best_val_accuracy": 0.8801, "epochs_run": 2, "train_seconds": 12.5,
    "images_per_second": 1534.2, "params": 11_170_000, "train_flops_per_image": 1.2e9, "achieved_flops_per_s": None,
    "cpu_percent_mean": 71.3, "process_cpu_percent_mean": 190.0, "cpu_seconds_total": 40.2, "mem_percent_mean": 33.0,
    "rss_peak_bytes": 900 * 2**20, "gpu_util_percent_mean": None, "gpu_memory_peak_bytes": None,
    "net_packets_per_s_mean": 4321.0, "net_bytes_total": 52_000_000, "energy_joules": None, "energy_sources": [],
    "comm_hook": "fp16", "comm_bytes_per_step": 22_340_000, "comm_bytes_total": 5.1e9,
    "comm_ring_bytes_per_step_formula": 22_340_000,
    "step_time_breakdown": {"data_wait": 0.001, "augmentation": 0.002, "forward": 0.01, "backward": 0.02,
                            "optimizer": 0.003, "step": 0.036},
    "hosts": {HOST: {"net_interfaces": ["eth0"], "net_bytes_total": 52_000_000, "net_packets_per_s_mean": 4321.0,
                     "net_bytes_per_s_mean": 4.1e6, "cpu_percent_mean": 71.3, "mem_percent_mean": 33.0,
                     "cpu_energy_joules": None, "ranks": [0, 1],
                     "interfaces": {"eth0": {"rx_bytes": 26e6, "tx_bytes": 26e6, "rx_packets": 27000,
                                             "tx_packets": 27100}}}},
    "a_future_figure": 42,
}


def rank_csv(rank: int, host_level: bool) -> str:
    """A rank's series as the sampler writes it: host-wide cells only on local rank 0, GPU cells empty."""
    columns = COLUMNS + (ETH0 if host_level else []) + TAIL
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for step, phase in enumerate(PHASES):
        row = dict.fromkeys(columns, "")
        row.update(time=1_700_000_000 + step, elapsed_s=float(step + 1), interval_s=1.0, phase=phase,
                   epoch=min(step // 3, 1), host=HOST, rank=rank, local_rank=rank,
                   process_cpu_percent=95.0 + 10 * rank + step, process_cpu_seconds=step * 1.0,
                   rss_bytes=(400 + 20 * step) * 2**20, rss_peak_bytes=(400 + 20 * step) * 2**20,
                   system_cpu_percent=70.0 + step, system_mem_percent=33.0,
                   cpu_energy_joules=10.0 * step if host_level else "")
        if host_level:
            row.update(net_bytes_per_s=4e6 + step * 1e5, net_packets_per_s=4000.0 + 50 * step)
            row.update(dict(zip(ETH0, (2e6, 2e6, 2000.0, 2000.0))))
        writer.writerow(row)
    return buffer.getvalue()


def make_run(root, summary: dict | None = SUMMARY, telemetry: bool = True):
    run = root / "run"
    (run / "telemetry").mkdir(parents=True)
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    if telemetry:
        (run / "telemetry" / "rank0.csv").write_text(rank_csv(0, host_level=True))
        torn = "1700000099.0,99.0,1.0,train,1,node-a,1,1,12"  # the rank was killed mid-line
        (run / "telemetry" / "rank1.csv").write_text(rank_csv(1, host_level=False) + torn)
    return run


def test_show_prints_the_table_and_draws_the_png(tmp_path):
    run = make_run(tmp_path)
    result = run_cli("show", str(run), timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("0.8765", "n/a", HOST, "4,321", "eth0", "(formula)", "36.00 ms", "forward", "a_future_figure"):
        assert expected in out, f"{expected!r} missing from:\n{out}"
    assert "n/a" in next(line for line in out.splitlines() if "GPU util" in line)  # null, not 0
    assert "27.8%" in out  # forward's share of the step
    png = run / "telemetry.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    assert str(png) in out
    assert not list(run.glob(".telemetry.png.*")), "the atomic write left a temporary file"


def test_png_path_and_no_plot(tmp_path):
    run = make_run(tmp_path)
    chosen = tmp_path / "figures" / "mine.png"
    assert run_cli("show", str(run), "--png", str(chosen), timeout=120).returncode == 0
    assert chosen.read_bytes()[:4] == b"\x89PNG"

    result = run_cli("show", str(run), "--no-plot", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "0.8765" in result.stdout
    assert not (run / "telemetry.png").exists()


def test_unfinished_run_shows_its_series(tmp_path):
    run = make_run(tmp_path, summary=None)
    result = run_cli("show", str(run), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "unfinished" in result.stdout and HOST in result.stdout
    assert (run / "telemetry.png").read_bytes()[:4] == b"\x89PNG"


def test_not_a_run_is_one_line_and_exit_2(tmp_path, capsys):
    assert "does not exist" in usage_error(capsys, "show", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "not a run directory" in usage_error(capsys, "show", tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    assert "not a directory" in usage_error(capsys, "show", tmp_path / "file")


def test_read_series_parses_numbers_keeps_gaps_and_skips_torn_lines(tmp_path):
    run = make_run(tmp_path)
    broken = rank_csv(10, host_level=False).replace("\n1700000003,", "\nbroken,", 1)  # time not a number
    (run / "telemetry" / "rank10.csv").write_text(broken)
    series = read_series(run)
    assert list(series) == [0, 1, 10]
    assert len(series[0]) == len(series[1]) == len(PHASES)  # rank 1's torn last line is dropped
    first = series[1][0]
    assert first["elapsed_s"] == 1.0 and first["rank"] == 1 and isinstance(first["epoch"], int)
    assert first["phase"] == "setup" and first["host"] == HOST
    assert first["net_packets_per_s"] is None and first["gpu_util_percent"] is None  # empty cell, never 0
    assert series[0][2]["net_packets_per_s"] == 4100.0 and series[0][0]["net.eth0.rx_packets_per_s"] == 2000.0
    assert len(series[10]) == len(PHASES) - 1  # a line that does not parse is skipped, the rest kept
