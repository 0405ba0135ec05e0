"""Precision, memory format and compilation: the same training, recorded, and refused where they cannot run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from helpers import usage_error
from distcnn import speed
from distcnn.config import make_config
from distcnn.errors import UsageError
from distcnn.launch import run
from distcnn.parallel import checks


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run per set of options, shared by the tests of this module: (summary, each epoch's train
    loss, final weights, run directory)."""
    folder, done = tmp_path_factory.mktemp("speed"), {}

    def train(**options) -> tuple[dict, list[float], dict[str, torch.Tensor], Path]:
        key = tuple(sorted(options.items()))
        if key not in done:
            out = folder / f"run{len(done)}"
            base = {"data": "synthetic:n=600,test=100", "model": "simplecnn", "width": 0.5, "epochs": 2,
                    "batch_size": 64, "threads": 2, "telemetry": "off", "val_fraction": 0.1, "optimizer": "sgd",
                    "out": str(out)}
            summary = run(make_config(base | options))
            with open(out / "epochs.csv") as handle:
                losses = [float(row["train_loss"]) for row in csv.DictReader(handle)]
            weights = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
            done[key] = summary, losses, weights, out
        return done[key]

    return train


def max_weight_difference(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())


# Eager, compiled and channels-last training compute the same sums in other orders, so their weights differ by
# rounding alone, which each later step amplifies (over 18 steps it once reached 1.7e-3). Compared after the 4
# SGD steps of one short epoch, the bound follows from fp32: a sum of K terms reordered differs by at most K·u
# relative (u = 2^-24; K ≤ 64 images × 28 × 28 positions per gradient element), so one step moves a weight by at
# most lr·K·u·|g| ≈ 0.05 × 5e4 × 6e-8 ≈ 1.5e-4 (|g| ≲ 1 here), 4 steps by ≤ 6e-4 < WEIGHT_TOLERANCE. Measured:
# 3e-7 (compile), 1.4e-5 (channels-last).
FOUR_STEPS = {"epochs": 1, "data": "synthetic:n=300,test=100"}  # 270 training images in batches of 64
WEIGHT_TOLERANCE = 1e-3


def test_channels_last_trains_as_nchw(trained):
    nchw, nchw_losses, nchw_weights, _ = trained(memory_format="contiguous", **FOUR_STEPS)
    nhwc, nhwc_losses, nhwc_weights, _ = trained(memory_format="channels-last", **FOUR_STEPS)
    assert nchw["memory_format"] == "contiguous" and nhwc["memory_format"] == "channels-last"
    assert nhwc_losses == pytest.approx(nchw_losses, rel=1e-4)
    assert max_weight_difference(nchw_weights, nhwc_weights) < WEIGHT_TOLERANCE


def test_bf16_follows_fp32_and_is_recorded(trained):
    fp32, fp32_losses, _, _ = trained(memory_format="contiguous")
    bf16, bf16_losses, bf16_weights, bf16_dir = trained(precision="bf16")
    assert bf16_losses == pytest.approx(fp32_losses, rel=0.03)  # bf16 keeps 8 bits of mantissa
    assert bf16_losses != fp32_losses, "autocast ran nothing in bf16"
    assert abs(bf16["test_accuracy"] - fp32["test_accuracy"]) < 0.1
    assert all(w.dtype == torch.float32 for w in bf16_weights.values() if w.is_floating_point()), "fp32 master weights"
    assert (bf16["precision"], fp32["precision"]) == ("bf16", "fp32")
    environment = json.loads((bf16_dir / "environment.json").read_text())
    assert environment["precision"] == "bf16" and environment["memory_format"] == bf16["memory_format"]
    assert environment["compile"] == "off" and bf16["compile_seconds"] is None


def test_fp16_trains_with_a_gradient_scaler_and_saves_it(trained):
    small = {"epochs": 1, "width": 0.25, "data": "synthetic:n=300,test=100"}  # fp16 on a CPU is slow (README)
    summary, losses, _, run_dir = trained(precision="fp16", **small)
    fp32, fp32_losses, _, _ = trained(memory_format="contiguous", **small)
    assert losses[0] == pytest.approx(fp32_losses[0], rel=0.05)
    assert abs(summary["test_accuracy"] - fp32["test_accuracy"]) < 0.1 and summary["precision"] == "fp16"
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["scaler"]["scale"] > 0, "the scaler's state is saved for --resume"


@pytest.mark.skipif(speed.missing_toolchain("cpu") is not None, reason="torch.compile needs g++ and Python.h")
@pytest.mark.slow
def test_compile_trains_as_eager_and_times_compilation_apart(trained):
    eager, eager_losses, eager_weights, _ = trained(memory_format="contiguous", **FOUR_STEPS)
    compiled, compiled_losses, compiled_weights, _ = trained(memory_format="contiguous", compile="default",
                                                             **FOUR_STEPS)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert max_weight_difference(eager_weights, compiled_weights) < WEIGHT_TOLERANCE
    assert compiled["compile"] == "default" and compiled["compile_seconds"] > 0
    assert eager["compile_seconds"] is None


def test_evaluation_seconds_per_epoch(trained):
    summary, _, _, run_dir = trained(memory_format="contiguous")
    with open(run_dir / "epochs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert all(float(row["eval_seconds"]) > 0 for row in rows)
    for row in rows:
        assert float(row["epoch_seconds"]) == pytest.approx(float(row["train_seconds"]) + float(row["eval_seconds"]))
    assert summary["eval_seconds"] == pytest.approx(sum(float(row["eval_seconds"]) for row in rows))


def test_auto_layout_is_the_measured_one_per_device():
    for (device, precision), layout in speed.FASTER_LAYOUT.items():
        assert speed.resolve_layout("auto", device, precision) == layout
        assert layout in ("channels-last", "contiguous")
    assert speed.resolve_layout("contiguous", "cuda", "bf16") == "contiguous"


def test_precision_memory_format_and_compile_are_study_factors(tmp_path):
    from distcnn.study.spec import parse_spec

    spec = parse_spec('[factors]\nprecision = ["fp32", "bf16"]\nmemory-format = ["contiguous", "channels-last"]\n'
                      'compile = ["off", "default"]\n[base]\ndata = "synthetic"\n', "speed")
    configs = [spec.run_config(levels, 0, tmp_path / "r", "r") for levels in spec.configurations()]
    assert {(c.precision, c.memory_format, c.compile) for c in configs} == {
        (p, m, k) for p in ("fp32", "bf16") for m in ("contiguous", "channels-last") for k in ("off", "default")}


# ---------------------------------------------------------------- refused in one line, before anything is written


def test_reduce_overhead_needs_a_gpu(tmp_path, capsys):
    line = usage_error(capsys, "train", "--data", "synthetic", "--device", "cpu", "--compile", "reduce-overhead",
                       "--out", tmp_path / "run")
    assert "CUDA graphs" in line and "--compile default" in line
    assert not (tmp_path / "run").exists()


def test_compile_without_a_compiler_names_what_is_missing(tmp_path, capsys, monkeypatch):
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-c++",))  # what CXX=no-such-c++ sets at import
    line = usage_error(capsys, "train", "--data", "synthetic", "--compile", "default", "--out", tmp_path / "run")
    assert "no-such-c++" in line and "C++ compiler" in line
    assert not (tmp_path / "run").exists()


def test_unknown_precision_names_the_choices():
    with pytest.raises(UsageError, match="fp32.*bf16.*fp16"):
        make_config({"precision": "fp8"})


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(UsageError) as error:
        checks.check_gpus(make_config({"nproc_per_node": 2}))
    message = str(error.value)
    assert "2 ranks" in message and "1 GPU visible" in message and "--nproc-per-node 1" in message
    assert "--device cpu" in message
    checks.check_gpus(make_config({"nproc_per_node": 1}))  # one rank per GPU is fine
    checks.check_gpus(make_config({"nproc_per_node": 2, "device": "cpu"}))  # CPU ranks need no GPU


def test_gpu_ranks_take_few_threads(monkeypatch):
    config = make_config({"nproc_per_node": 1})
    monkeypatch.setattr("distcnn.config.available_cores", lambda: 16)
    assert config.threads_per_rank(1, gpu=True) <= 4
    assert config.threads_per_rank(1, gpu=False) == 16
    assert make_config({"threads": 6}).threads_per_rank(1, gpu=True) == 6


def test_an_emulated_hosts_ranks_share_its_own_cores_only(monkeypatch):
    from distcnn.config import HOST_ENV, share_of_cores

    cores = list(range(16))
    assert share_of_cores(0, 2, cores) == list(range(8)) and share_of_cores(1, 2, cores) == list(range(8, 16))
    assert share_of_cores(1, 3, [0, 1, 2, 3, 4, 5, 6]) == [2, 3], "an even share each; a core left over stays free"
    assert [share_of_cores(i, 3, [0, 1]) for i in (0, 1, 2)] == [[0], [1], [0]], "more hosts than cores: they share"
    config = make_config({"cluster": "emulated", "nnodes": 2, "nproc_per_node": 2})
    monkeypatch.setattr("distcnn.config.available_cores", lambda: 16)
    assert config.threads_per_rank() == 4, "the launcher: 16 cores for 2 hosts of 2 ranks"
    monkeypatch.setenv(HOST_ENV, "distcnn-h1")
    monkeypatch.setattr("distcnn.config.available_cores", lambda: 8)  # inside host 1, pinned to its 8 cores
    assert config.threads_per_rank() == 4, "a rank inside a host shares the host's cores with its own ranks only"


def test_gpu_only_and_toolchain_checks_in_words(monkeypatch):
    with pytest.raises(UsageError, match="reduce-overhead"):
        speed.check("fp32", "reduce-overhead", "cpu")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert "triton" in speed.missing_toolchain("cuda")
