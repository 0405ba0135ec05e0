"""Nothing lost, nobody in: the launcher and its ranks listen on loopback only (a single-machine run) or on their
own address, ranks this machine cannot hold are refused before they start, and a rank that dies is named, with
how it died and how to continue the run."""

from __future__ import annotations

import ipaddress
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from distcnn.config import available_cores, make_config
from distcnn.errors import UsageError
from distcnn.parallel import addresses, checks, torchrun
from helpers import ROOT, TWO_RANKS, usage_error


def family_of(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return []


def listening(processes: list[psutil.Process]) -> dict[tuple[str, int], str]:
    """The TCP ports these processes listen on right now: (address, port) -> 'launcher' or 'rank'."""
    found = {}
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
            role = "rank" if "distcnn.worker" in " ".join(process.cmdline()) else "launcher"
        except psutil.Error:  # it ended while we looked
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN:
                found[(connection.laddr.ip, connection.laddr.port)] = role
    return found


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distcnn", "train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- problem 1: the rendezvous store and the ranks listen on loopback ------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ["none", "given"])
def test_a_single_machine_run_listens_on_loopback_only(tmp_path, endpoint):
    """The store is unauthenticated and carries pickled state: on one machine, nothing listens beyond it."""
    extra = ("--rdzv-endpoint", f"127.0.0.1:{free_port()}") if endpoint == "given" else ()
    job = start(*TWO_RANKS, *extra, "--out", str(tmp_path / "run"))
    seen, rank_variables = {}, {}
    try:
        launcher = psutil.Process(job.pid)
        while job.poll() is None:  # every 0.1 s while the run lasts
            processes = family_of(launcher)
            seen |= listening(processes)
            for process in processes[1:]:
                try:
                    if not rank_variables and "distcnn.worker" in " ".join(process.cmdline()):
                        rank_variables = process.environ()
                except psutil.Error:
                    pass
            time.sleep(0.1)
        output = job.stdout.read()
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output
    assert "launcher" in seen.values() and "rank" in seen.values(), f"the store and gloo listen: {seen}"
    outside = {key: role for key, role in seen.items() if not ipaddress.ip_address(key[0]).is_loopback}
    assert not outside, f"listening beyond loopback: {outside}"
    assert rank_variables.get("GLOO_SOCKET_IFNAME") == rank_variables.get("NCCL_SOCKET_IFNAME") == "lo"
    assert rank_variables.get("MASTER_ADDR") == "127.0.0.1"


def test_the_rendezvous_store_binds_its_host_not_every_interface():
    """torchrun's c10d store (made inside the launcher) listens where the endpoint says, and only there."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters, c10d_rendezvous_backend

    params = RendezvousParameters("c10d", "127.0.0.1:0", "probe", 1, 1)
    with addresses.own_addresses_only(one_machine=True):
        _, store = c10d_rendezvous_backend.create_backend(params)
    ports = {port for (address, port) in listening([psutil.Process()]) if address == "127.0.0.1"}
    assert store.port in ports
    assert all(ipaddress.ip_address(address).is_loopback for address, _ in listening([psutil.Process()]))
    del store


def test_a_single_machine_meets_at_loopback_and_several_at_their_endpoint(tmp_path):
    one = torchrun.torchrun_args(make_config({"nproc_per_node": 2}), tmp_path)
    assert "--standalone" not in one
    assert {"--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--local-addr=127.0.0.1", "--nnodes=1"} <= set(one)
    two = torchrun.torchrun_args(make_config({"nnodes": 2, "rdzv_endpoint": "127.0.0.1:29517"}), tmp_path)
    assert {"--rdzv-endpoint=127.0.0.1:29517", "--local-addr=127.0.0.1", "--nnodes=2"} <= set(two)


# ---- problem 2: ranks this machine cannot hold ------------------------------------------------------------------

def test_more_cpu_ranks_than_cores_is_refused_in_one_line(tmp_path, capsys):
    ranks, cores = max(64, available_cores() + 1), available_cores()
    line = usage_error(capsys, "train", "--data", "synthetic:n=700", "--device", "cpu", "--nproc-per-node",
                       str(ranks), "--out", tmp_path / "run")
    assert f"{ranks} CPU ranks" in line and f"{cores} core" in line, line
    assert "--oversubscribe" in line and f"--nproc-per-node {cores}" in line, line
    assert not (tmp_path / "run").exists()


def test_oversubscribe_lets_them_start():
    checks.check_ranks(make_config({"nproc_per_node": 64, "device": "cpu", "oversubscribe": True}))
    checks.check_ranks(make_config({"nproc_per_node": min(2, available_cores()), "device": "cpu"}))


def test_more_ranks_than_memory_holds_is_refused_as_an_estimate(monkeypatch):
    class Memory:
        available = 3 * checks.RANK_MEMORY + 1

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory())
    monkeypatch.setattr(checks, "available_cores", lambda: 64)
    with pytest.raises(UsageError) as refused:
        checks.check_ranks(make_config({"nproc_per_node": 4, "device": "cpu"}))
    message = str(refused.value)
    assert "4 ranks need at least" in message and "an estimate" in message and "--nproc-per-node 3" in message
    checks.check_ranks(make_config({"nproc_per_node": 3, "device": "cpu"}))
    checks.check_ranks(make_config({"nproc_per_node": 4, "device": "cpu", "oversubscribe": True}))


def test_emulated_hosts_count_as_ranks_of_this_machine(monkeypatch):
    monkeypatch.setattr(checks, "available_cores", lambda: 2)
    checks.check_ranks(make_config({"cluster": "emulated", "nnodes": 2, "nproc_per_node": 1, "device": "cpu"}))
    with pytest.raises(UsageError, match="4 CPU ranks.*at most 2 ranks in all"):
        checks.check_ranks(make_config({"cluster": "emulated", "nnodes": 2, "nproc_per_node": 2,
                                          "device": "cpu"}))


# ---- problem 3: the rank that died first ------------------------------------------------------------------------

def failure(exitcode: int, timestamp: int = 100):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    made = ProcessFailure(local_rank=0, pid=1, exitcode=exitcode, error_file="/nonexistent")
    made.timestamp = timestamp
    return made


def test_the_rank_that_failed_first_is_named_not_the_one_the_launcher_stopped(tmp_path):
    # torchrun lists the ranks it saw fail before those it then stopped, stamped to the second
    error = torchrun.workers_failed({1: failure(-signal.SIGKILL), 0: failure(-signal.SIGTERM)}, tmp_path)
    assert str(error).startswith("rank 1 failed first (killed by SIGKILL), then rank 0 (stopped by the launcher)")
    assert f"`distcnn train --out {tmp_path} --resume`" in str(error) and error.exit_code == -signal.SIGKILL
    seen_together = torchrun.workers_failed({0: failure(1), 1: failure(-signal.SIGKILL)}, tmp_path)
    assert str(seen_together).startswith("rank 1 failed first (killed by SIGKILL), then rank 0 (exit code 1)")
    earlier = torchrun.workers_failed({0: failure(-signal.SIGTERM, 101), 1: failure(1, 100)}, tmp_path)
    assert str(earlier).startswith("rank 1 failed first (exit code 1)")


def test_a_rank_that_stopped_on_a_user_mistake_keeps_exit_code_2(tmp_path):
    error = torchrun.workers_failed({0: failure(-signal.SIGTERM), 1: failure(2)}, tmp_path)
    assert error.exit_code == 2 and "rank 1 failed first (exit code 2)" in str(error)
    assert "--resume" not in str(error)


def rank_of(process: psutil.Process) -> int | None:
    try:
        return int(process.environ()["RANK"]) if "distcnn.worker" in " ".join(process.cmdline()) else None
    except (psutil.Error, KeyError, ValueError):
        return None


def signal_rank_1_after_epoch_1(job: subprocess.Popen, out: Path, sig: int, timeout: float):
    """Send `sig` to rank 1 of `job` once its first epoch is checkpointed; then wait for the job to end:
    (what it printed, the rank's process)."""
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            epochs = out / "epochs.csv"
            victim = next((p for p in family_of(psutil.Process(job.pid)) if rank_of(p) == 1), None)
            if epochs.exists() and len(epochs.read_text().splitlines()) >= 2 and victim is not None:
                victim.send_signal(sig)
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the run never reached its second epoch")
        output, _ = job.communicate(timeout=timeout)
    finally:
        if job.poll() is None:
            job.kill()
    return output, victim


def one_error_line(job: subprocess.Popen, output: str) -> str:
    """The job ended with exit code 1 and one `distcnn: error:` line, no traceback after it: that line."""
    lines = [line for line in output.splitlines() if line.startswith("distcnn: error:")]
    assert job.returncode == 1 and len(lines) == 1, output
    assert "Traceback" not in output.split(lines[0])[1], output
    return lines[0]


@pytest.mark.slow
def test_a_rank_killed_without_restarts_is_named_with_its_signal_and_the_way_to_resume(tmp_path):
    out = tmp_path / "killed"
    job = start("--data", "synthetic:n=1600", "--epochs", "4", "--batch-size", "32", "--nproc-per-node", "2",
                "--seed", "2", "--sample-interval", "0.1", "--out", str(out))
    output, _ = signal_rank_1_after_epoch_1(job, out, signal.SIGKILL, timeout=300)
    line = one_error_line(job, output)
    assert "rank 1 failed first (killed by SIGKILL)" in line and f"distcnn train --out {out} --resume" in line
    assert Path(out, "checkpoint.pt").exists(), "the run continues from its checkpoint"


@pytest.mark.slow
def test_a_stopped_rank_is_named_within_the_collective_timeout_and_ended(tmp_path):
    out = tmp_path / "stopped"
    job = start("--data", "synthetic:n=2400", "--epochs", "4", "--batch-size", "32", "--nproc-per-node", "2",
                "--collective-timeout", "5", "--seed", "2", "--out", str(out))
    # stopped, rank 1 does not die: without the timeout torch would wait 30 minutes
    output, victim = signal_rank_1_after_epoch_1(job, out, signal.SIGSTOP, timeout=120)
    line = one_error_line(job, output)
    assert f"rank 1 (host {socket.gethostname()}, pid {victim.pid}) stopped making progress" in line, output
    assert "waited 5 s (--collective-timeout)" in line and f"--out {out} --resume" in line, output
    assert "Traceback" not in output, output
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE, "the stopped rank ended"
    assert Path(out, "checkpoint.pt").exists() and not Path(out, "stalled.txt").exists()


def test_a_rendezvous_port_another_program_listens_on_is_one_line_before_launch(tmp_path, capsys):
    port = free_port()
    listener = subprocess.Popen([sys.executable, "-c", "import socket, time; s = socket.socket(); "
                                 f"s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); time.sleep(120)"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "up"
        out = tmp_path / "run"
        line = usage_error(capsys, "train", *TWO_RANKS, "--rdzv-endpoint", f"127.0.0.1:{port}", "--out", out)
        assert f"port {port} is already taken" in line and f"pid {listener.pid}" in line and "free port" in line
        assert not out.exists(), "refused before anything was written"
    finally:
        listener.kill()
        listener.wait()
    config = make_config({"nproc_per_node": 2, "rdzv_endpoint": f"127.0.0.1:{port}"})
    checks.check_endpoint(config)  # free again: nothing to say


def test_a_rendezvous_that_distcnn_or_torchrun_hosts_is_joined_not_refused():
    assert addresses.is_rendezvous(["/opt/distcnn/.venv/bin/python", "-m", "distcnn", "train"])
    assert addresses.is_rendezvous(["python", "-m", "distcnn.node_agent", "run"])
    assert addresses.is_rendezvous(["/usr/bin/torchrun", "--nnodes", "2"])
    assert not addresses.is_rendezvous(["/opt/distcnn/.venv/bin/python", "-c", "serve()"]), "the path is no name"
    assert not addresses.is_rendezvous(["nginx", "-g", "daemon off;"])


def test_a_rendezvous_endpoint_that_never_answers_is_one_line_naming_it(tmp_path, monkeypatch):
    from distcnn.errors import RunInterrupted
    from distcnn.ownership import PARENT_ENV

    monkeypatch.setenv(PARENT_ENV, "1")  # (launch marks itself the ranks' parent; the test's env stays as it was)
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there, and this machine does not host it (is_host=0)
    config = make_config({"nnodes": 2, "rdzv_endpoint": endpoint, "out": str(tmp_path / "run")})
    start = time.monotonic()
    with pytest.raises(RunInterrupted) as error:
        torchrun.launch(config, tmp_path / "run", rdzv_conf="read_timeout=3,is_host=0")
    line = str(error.value)
    assert f"rendezvous at {endpoint} failed" in line and "could not be reached" in line and "\n" not in line
    assert time.monotonic() - start < 60, "the read timeout it was given, not torch's 60 s default"


def test_an_endpoint_that_accepts_but_never_answers_as_a_store_is_one_line_after_the_read_timeout(tmp_path,
                                                                                                   monkeypatch):
    """A listener this machine cannot name (on another machine, or another user's) that accepts and stays
    silent: torch's store client would wait for its handshake without end. A real store is joined at once."""
    import threading
    from datetime import timedelta

    from torch.distributed import TCPStore

    from distcnn.errors import RunInterrupted
    from distcnn.ownership import PARENT_ENV

    monkeypatch.setenv(PARENT_ENV, "1")
    silent = socket.create_server(("127.0.0.1", 0))
    held: list = []
    threading.Thread(target=lambda: [held.append(silent.accept()) for _ in range(8)], daemon=True).start()
    port = silent.getsockname()[1]
    config = make_config({"nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{port}", "out": str(tmp_path / "run")})
    start = time.monotonic()
    with pytest.raises(RunInterrupted) as error:
        torchrun.launch(config, tmp_path / "run", rdzv_conf="read_timeout=2")
    line = str(error.value)
    assert f"rendezvous at 127.0.0.1:{port} failed" in line and "did not answer as a rendezvous store" in line
    assert "\n" not in line and time.monotonic() - start < 30, "the read timeout it was given, then one line"
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
    assert not addresses.silent_listener("127.0.0.1", store.port, 5), "a store answers"
    assert not addresses.silent_listener("127.0.0.1", free_port(), 5), "nothing listens: torch waits for it"


def test_a_rank_that_crashes_after_its_run_finished_is_a_warning_not_a_failed_run(tmp_path, monkeypatch):
    """A rank that aborts on its way out (seen once: `terminate called without an active exception` from a
    rank of an emulated host after its run's summary was written) loses nothing: rank 0 writes the summary
    last. Before the summary it is the failure it is."""
    from distcnn.errors import FailedAfterTheRun, WorkersFailed
    from distcnn.ownership import PARENT_ENV

    monkeypatch.setenv(PARENT_ENV, "1")
    monkeypatch.chdir(ROOT / "tests")  # where the ranks find `python -m abort_worker`
    config = make_config({"nproc_per_node": 2, "out": str(tmp_path / "run")})
    (tmp_path / "run").mkdir()
    with pytest.raises(WorkersFailed) as error:
        torchrun.launch(config, tmp_path / "run", worker="abort_worker")
    assert "killed by SIGABRT" in str(error.value) and "--resume" in str(error.value)
    assert not isinstance(error.value, FailedAfterTheRun)
    (tmp_path / "run" / "summary.json").write_text("{}")
    with pytest.raises(FailedAfterTheRun) as warning:  # the launcher and the node agents say it as a warning
        torchrun.launch(config, tmp_path / "run", worker="abort_worker")
    assert "killed by SIGABRT" in str(warning.value) and "after the run had finished" in str(warning.value)
    assert "--resume" not in str(warning.value), "nothing to continue"


def test_each_way_a_backend_words_a_collective_timeout_is_read_as_one():
    """A stopped rank met in DDP's buffer broadcast (forward) reads "Application timeout caused pair closure"
    from gloo, not the "Timed out waiting" of a receive: both are the timeout that names the stopped rank."""
    from distcnn.parallel import world

    for text in ("[../gloo/transport/tcp/pair.cc:534] Timed out waiting 5000ms for recv operation to complete",
                 "RuntimeError: Application timeout caused pair closure",
                 "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE)"):
        assert world.is_timeout(RuntimeError(text)), text
    assert not world.is_timeout(RuntimeError("Connection reset by peer")), "a peer that died is no timeout"
