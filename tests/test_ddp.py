"""Real 2-rank gloo DDP runs, launched through torchrun by `distcnn train --nproc-per-node 2`."""

from __future__ import annotations

import pytest
import torch

from distcnn.models import create_model
from helpers import cli, read_summary, run_cli

pytestmark = pytest.mark.slow  # every test here launches several processes


def train(tmp_path, name, *args):
    out = tmp_path / name
    result = run_cli("train", "--data", "synthetic", "--out", str(out), *args, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_two_rank_gloo_run_learns_and_records_its_world(two_rank_run):
    out, summary = two_rank_run
    assert summary["world_size"] == 2
    assert summary["test_accuracy"] > 0.3, "10 classes: chance is 0.1"
    environment = (out / "environment.json").read_text()
    assert '"backend": "gloo"' in environment and '"threads_per_rank": 1' in environment


def test_two_ranks_of_batch_b_give_the_gradient_of_one_rank_of_batch_2b(tmp_path, capsys):
    """One plain SGD step (lr 1, no momentum, no decay) moves the weights by exactly minus the gradient.

    The model has no BatchNorm: with it, each rank would normalise by its own half-batch statistics and the
    two set-ups would legitimately differ (that is what SyncBatchNorm is for)."""
    common = ["--model", "lenet", "--epochs", "1", "--train-subset", "64", "--val-fraction", "0",
              "--optimizer", "sgd", "--lr", "1", "--momentum", "0", "--weight-decay", "0",
              "--schedule", "cosine", "--seed", "3"]
    two = train(tmp_path, "two", *common, "--nproc-per-node", "2", "--batch-size", "32")
    one = tmp_path / "one"  # one rank: in this process
    assert cli(capsys, "train", "--data", "synthetic", "--out", one, *common, "--batch-size", "64")[0] == 0
    for run_dir in (two, one):
        assert read_summary(run_dir)["images_seen"] == 64
    a = torch.load(two / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(one / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    torch.manual_seed(3)  # the trainer's initial weights: the step really moved every tensor
    initial = create_model("lenet", in_chans=1, num_classes=10).state_dict()
    for key in a:
        assert (a[key] - initial[key]).abs().max() > 1e-4, key


def test_two_machines_through_a_static_rendezvous(tmp_path):
    """Two node agents (one rank each) on this machine, sharing one run directory, as two hosts with NFS would."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "two-nodes"
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "distcnn", "train", "--data", "synthetic", "--epochs", "1", "--batch-size", "32",
         "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "static", "--node-rank", str(rank),
         "--rdzv-endpoint", f"127.0.0.1:{port}", "--threads", "1", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    summary = read_summary(out)
    assert summary["world_size"] == 2 and summary["test_accuracy"] > 0.2
