"""The emulated cluster: hosts as network namespaces, a real 2-node torchrun job over them, and a clean teardown.

The tests that build namespaces need root and iproute2 (CI runs as root); elsewhere they are skipped, and the
one-line refusals are tested everywhere.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import CAN_BUILD_CLUSTER, TWO_HOSTS_RATE, read_summary, run_cli, usage_error

pytestmark = pytest.mark.emulated_cluster
needs_root = pytest.mark.skipif(not CAN_BUILD_CLUSTER,
                                reason="the emulated cluster needs root and iproute2 (ip, tc)")


def distcnn_namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
    return [line.split()[0] for line in listed if line.startswith("distcnn-")]


def veth_links() -> list[str]:
    return [line for line in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
            .splitlines() if "veth" in line]


@pytest.fixture
def cluster_down():
    """Whatever a test brings up is gone afterwards, and must leave nothing behind."""
    veths_before = veth_links()
    yield
    assert run_cli("cluster", "down").returncode == 0
    assert distcnn_namespaces() == []
    assert veth_links() == veths_before
    assert not list(Path("/etc/netns").glob("distcnn-*"))


def reach(source: str, address: str) -> bool:
    """Can a process inside host `source` open a TCP connection to a listener at `address`?"""
    server = subprocess.Popen(["ip", "netns", "exec", f"distcnn-h{address.rsplit('.', 1)[1]}", sys.executable, "-c",
                               "import socket; s = socket.socket(); s.bind(('0.0.0.0', 5099)); s.listen(1); "
                               "s.settimeout(20); c, _ = s.accept(); c.sendall(b'ok')"])
    try:
        client = subprocess.run(["ip", "netns", "exec", source, sys.executable, "-c",
                                 "import socket, sys, time\n"
                                 "for _ in range(100):\n"
                                 "    try:\n"
                                 f"        c = socket.create_connection(('{address}', 5099), timeout=2); break\n"
                                 "    except OSError: time.sleep(0.05)\n"
                                 "print(c.recv(2).decode())"], capture_output=True, text=True, timeout=30)
        return client.stdout.strip() == "ok"
    finally:
        server.kill()
        server.wait()


@needs_root
@pytest.mark.slow
def test_two_hosts_train_a_two_node_job_with_per_host_traffic_and_exact_bytes(two_host_run, cluster_down):
    up = run_cli("cluster", "up", "--hosts", "2", "--bandwidth", TWO_HOSTS_RATE)
    assert up.returncode == 0, up.stderr
    assert sorted(distcnn_namespaces()) == ["distcnn-h1", "distcnn-h2"]
    status = run_cli("cluster", "status").stdout
    assert "198.18.0.1" in status and "198.18.0.2" in status and "rate 1Gbit" in status

    out = two_host_run  # a 2-node lenet job on such hosts (conftest.py)
    summary = read_summary(out)
    assert summary["world_size"] == 2
    assert summary["test_accuracy"] > 0.3, "the 2-node job learned (10 classes: chance is 0.1)"

    # One entry per emulated host, each with its own counters, on its own eth0, with packets on it.
    hosts = summary["hosts"]
    assert sorted(hosts) == ["distcnn-h1", "distcnn-h2"]
    assert sorted(rank for host in hosts.values() for rank in host["ranks"]) == [0, 1]
    epochs = list(csv.DictReader((out / "epochs.csv").open()))
    steps = sum(int(row["steps"]) for row in epochs)  # per rank
    for name, host in hosts.items():
        assert host["net_interfaces"] == ["eth0"], name
        assert host["net_packets_total"] > 0 and host["net_bytes_total"] > 0, name
        assert host["interfaces"]["eth0"]["tx_packets"] > 0 and host["interfaces"]["eth0"]["rx_packets"] > 0

    # Exact communication bytes: what the comm hook handed to allreduce is the gradient, every step.
    assert summary["comm_bytes_per_step"] == summary["gradient_bytes"]
    counted_per_rank = summary["comm_bytes_total"] / 2
    for name, host in hosts.items():
        sent = host["interfaces"]["eth0"]["tx_bytes"]
        # With 2 ranks gloo's ring sends each rank's buffer once (2(N-1)/N = 1x); headers add a little.
        assert counted_per_rank <= sent <= 1.5 * counted_per_rank, (name, sent, counted_per_rank)
    assert summary["comm_bytes_total"] == 2 * steps * summary["gradient_bytes"]

    layout = json.loads((out / "cluster.json").read_text())
    assert [host["name"] for host in layout["hosts"]] == ["distcnn-h1", "distcnn-h2"]
    assert all("rate 1Gbit" in host["caps"] for host in layout["hosts"])
    environment = json.loads((out / "environment.json").read_text())
    assert sorted(environment["hosts"]) == ["distcnn-h1", "distcnn-h2"]  # rank 0 is whichever node joined first
    from distcnn.config import share_of_cores

    # each host on cores of its own (rank 0's host is either)
    assert environment["cpu_affinity"] in (share_of_cores(0, 2), share_of_cores(1, 2)), environment["cpu_affinity"]

    down = run_cli("cluster", "down")
    assert down.returncode == 0 and "distcnn-h1" in down.stdout
    assert distcnn_namespaces() == []


@needs_root
def test_more_hosts_share_a_bridge_and_up_clears_an_earlier_cluster(cluster_down):
    assert run_cli("cluster", "up", "--hosts", "3").returncode == 0
    assert sorted(distcnn_namespaces()) == ["distcnn-h1", "distcnn-h2", "distcnn-h3", "distcnn-switch"]
    assert reach("distcnn-h1", "198.18.0.3") and reach("distcnn-h3", "198.18.0.2")
    again = run_cli("cluster", "up", "--hosts", "2", "--bandwidth", "50mbit")
    assert again.returncode == 0, again.stderr
    assert sorted(distcnn_namespaces()) == ["distcnn-h1", "distcnn-h2"], "the stale third host and switch are gone"
    assert reach("distcnn-h2", "198.18.0.1")


@needs_root
@pytest.mark.slow
def test_a_bandwidth_cap_limits_throughput(cluster_down):
    """A 20 Mbit/s cap lets about 20 Mbit/s through (uncapped, a veth moves gigabits)."""
    assert run_cli("cluster", "up", "--hosts", "2", "--bandwidth", "20mbit").returncode == 0
    receive = ("import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 5098)); s.listen(1); "
               "c, _ = s.accept(); n = 0; t = time.time()\n"
               "while True:\n    d = c.recv(1 << 20)\n    if not d: break\n    n += len(d)\n"
               "print(n * 8 / (time.time() - t) / 1e6)")
    server = subprocess.Popen(["ip", "netns", "exec", "distcnn-h2", sys.executable, "-c", receive],
                              stdout=subprocess.PIPE, text=True)
    send = ("import socket, time\nfor _ in range(100):\n    try:\n"
            "        c = socket.create_connection(('198.18.0.2', 5098), timeout=2); break\n"
            "    except OSError: time.sleep(0.05)\n"
            "c.sendall(b'x' * 5_000_000); c.close()")
    subprocess.run(["ip", "netns", "exec", "distcnn-h1", sys.executable, "-c", send], check=True, timeout=60)
    mbit = float(server.communicate(timeout=60)[0])
    assert 12 < mbit < 22, f"{mbit:.1f} Mbit/s through a 20mbit cap"


def test_without_root_the_cluster_says_so_in_one_line(monkeypatch, capsys):
    from distcnn import cli

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["cluster", "up", "--hosts", "2"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "needs root" in error


def test_bad_cluster_options_are_one_line(tmp_path, capsys):
    cases = [
        (["cluster", "up", "--hosts", "2", "--bandwidth", "100mb"], "100mbit"),
        (["train", "--bandwidth", "100mbit", "--out", str(tmp_path / "a")], "--cluster emulated"),
        (["train", "--cluster", "emulated", "--nnodes", "2", "--rdzv-endpoint", "h:1", "--out", str(tmp_path / "b")],
         "picks the rendezvous"),
        (["train", "--cluster", "emulated", "--delay", "soon", "--out", str(tmp_path / "c")], "1ms"),
        (["cluster", "sideways"], "invalid choice"),
    ]
    for args, expected in cases:
        assert expected in usage_error(capsys, *args), args
    assert not any((tmp_path / name).exists() for name in "abc")


@needs_root
def test_training_on_a_cluster_that_is_down_is_one_line_and_writes_nothing(tmp_path, cluster_down, capsys):
    run_cli("cluster", "down")
    line = usage_error(capsys, "train", "--cluster", "emulated", "--nnodes", "2", "--data", "synthetic:n=200",
                       "--out", tmp_path / "run")
    assert "distcnn cluster up --hosts 2" in line
    assert not (tmp_path / "run").exists()


def test_a_study_on_the_emulated_cluster_refuses_before_its_first_run_when_no_cluster_is_up(tmp_path, capsys):
    if CAN_BUILD_CLUSTER:
        run_cli("cluster", "down")
    study = tmp_path / "emulated.toml"
    study.write_text('[base]\ndata = "synthetic:n=200"\nepochs = 1\ncluster = "emulated"\nnnodes = 2\n\n'
                     '[factors]\nbandwidth = ["100mbit", "none"]\n\n[study]\nreplicates = 1\n')
    line = usage_error(capsys, "study", study, "--out", tmp_path / "out")
    assert ("distcnn cluster up --hosts 2" in line) or ("needs root" in line)
    assert not (tmp_path / "out" / "study.db").exists()


@needs_root
@pytest.mark.slow
def test_a_host_whose_agent_dies_ends_the_run_in_one_line_within_40_seconds(tmp_path, cluster_down):
    """The launcher watches every agent: one killed on host 2 ends the job (not the rendezvous's 5-minute wait)."""
    import time

    import psutil

    from helpers import ROOT

    assert run_cli("cluster", "up", "--hosts", "2").returncode == 0
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "distcnn", "train", "--cluster", "emulated", "--nnodes", "2",
                            "--data", "synthetic:n=3000", "--epochs", "5", "--batch-size", "32", "--out", str(out)],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and time.monotonic() < deadline:  # host 2's agent, once its workers train
        agents = [p for p in psutil.process_iter(["cmdline"]) if "distcnn.node_agent" in (p.info["cmdline"] or [])
                  and str(out) in p.info["cmdline"] and "198.18.0.2" in p.info["cmdline"]]
        if agents and any("distcnn.worker" in " ".join(c.cmdline()) for c in agents[0].children(recursive=True)):
            victim = agents[0]
        time.sleep(0.2)
    assert victim is not None, "host 2's agent never started its workers"
    time.sleep(2)
    victim.kill()
    killed_at = time.monotonic()
    _, stderr = job.communicate(timeout=240)
    assert job.returncode == 1
    # 3 s for the others to say why on their own (FAILED_SETTLE_S), then they are stopped: about 10 s in all
    assert time.monotonic() - killed_at < 40, "3 s for the others to stop, a few to stop their idle agents"
    assert "the node agent on distcnn-h2 failed" in stderr


@needs_root
@pytest.mark.slow
def test_a_host_whose_ranks_fail_after_the_run_finished_leaves_no_agent_waiting(tmp_path, cluster_down,
                                                                                  monkeypatch):
    """Rank 1 aborts on its way out after the run's summary was written (seen in the suite): its agent says it as
    a warning; the first host's agent, whose ranks ended well, waits in torchrun's exit barrier for it (300 s)
    and is stopped after a moment: the finished run stands."""
    import time

    from distcnn import cluster
    from distcnn.config import make_config
    from distcnn.ownership import PARENT_ENV
    from distcnn.parallel import emulated

    cluster.up(2)
    monkeypatch.setattr(emulated, "AGENTS_SETTLE_S", 3.0)  # what the wait is for, not how long it is: sooner
    monkeypatch.setenv(PARENT_ENV, "1")
    monkeypatch.setenv("ABORT_RANKS", "1")
    monkeypatch.chdir(Path(__file__).parent)  # where the ranks find `python -m abort_worker`
    run_dir = tmp_path / "run"
    config = make_config({"cluster": "emulated", "nnodes": 2, "out": str(run_dir)})
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(config.model_dump(mode="json")))
    (run_dir / "summary.json").write_text("{}")
    start = time.monotonic()
    emulated.launch_emulated(config, run_dir, worker="abort_worker")  # raises nothing: the run stands
    assert time.monotonic() - start < 60, "no agent waited out torchrun's 300 s exit barrier"
