"""Several runs of a study at once on one machine (`--parallel N`): each run in a process of its own, pinned to
disjoint cores (`os.sched_setaffinity`: its ranks then use cores / N threads) and, where the runs train on
GPUs, to disjoint GPUs (`CUDA_VISIBLE_DEVICES`).

Runs that ran side by side shared the machine's memory bandwidth, caches and disk: their resource figures are
not comparable with those of runs that ran alone. Each run's placement (its slot, cores, GPUs and the runs it
ran beside) goes into study.db and into its environment.json, and `runs_alongside` is a column the analysis
can take as a blocking factor.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

from distcnn.config import share_of_cores
from distcnn.console import say
from distcnn.errors import UsageError
from distcnn.parallel import world
from distcnn.record import PLACEMENT_ENV
from distcnn.study import job

POLL_SECONDS = 0.2
LOGS = "logs"  # STUDY_DIR/logs/<run_id>.log: what each run's process printed


def start_fork_server():
    """Each run's process forks from a server that imports distcnn and torch once (a fresh interpreter per
    run would import them again, seconds each) and never runs torch itself, so forking it is safe. Started
    early (the study calls this before it checks its configurations), the server imports meanwhile."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["distcnn.study.job"])
    from multiprocessing import forkserver

    forkserver.ensure_running()  # spawns the server and returns; its imports run beside this process
    return context


def plan_slots(count: int, gpus: bool) -> list[dict]:
    """`count` disjoint shares of this machine: cores (all of them, split evenly) and, for GPU runs, GPUs."""
    cores = sorted(os.sched_getaffinity(0))
    if count > len(cores):
        raise UsageError(f"--parallel {count}: this machine has {len(cores)} cores for the study; at most "
                         f"{len(cores)} runs at once")
    devices = []
    if gpus:
        import torch

        available = torch.cuda.device_count()
        if count > available:
            raise UsageError(f"--parallel {count}: the runs train on GPUs and {available} are visible; at most "
                             f"{available} runs at once, one GPU or more each")
        devices = [list(range(available))[i::count] for i in range(count)]
    return [{"slot": i, "cpus": share_of_cores(i, count, cores), "gpus": devices[i] if gpus else None}
            for i in range(count)]


class SideBySide:
    """Runs `parallel` runs at a time, each in its own process; the study process claims and records them."""

    def __init__(self, runner):
        self.runner, self.store = runner, runner.store
        configs = [runner.config(run) for run in runner.pending()]
        uses_gpu = any(world.device_type(config.device) == "cuda" for config in configs)
        self.slots = plan_slots(runner.spec.parallel, uses_gpu)
        self.logs = Path(runner.out) / LOGS
        self.active: dict[str, dict] = {}  # run_id -> its process, slot, start, log and the runs beside it
        self.context = start_fork_server()

    def run(self) -> None:
        self.logs.mkdir(exist_ok=True)
        try:
            while todo := self.runner.pending():
                queue = list(todo)
                while queue or self.active:
                    while queue and len(self.active) < len(self.slots):
                        self.start(queue.pop(0))
                    time.sleep(POLL_SECONDS)
                    for run_id in [r for r, a in self.active.items() if a["process"].exitcode is not None]:
                        self.end(run_id)
        finally:
            for active in self.active.values():  # interrupted: the runs stop with the study (and resume)
                active["process"].kill()
                active["process"].join()

    def start(self, run: dict) -> None:
        config = self.runner.config(run)
        if not self.store.claim(run["run_id"], Path(config.out), self.runner.owner):
            say(f"   {run['run_id']} is done or taken by another runner; skipped")
            return
        used = {a["slot"]["slot"] for a in self.active.values()}
        slot = next(s for s in self.slots if s["slot"] not in used)
        beside = set(self.active)
        for other in self.active.values():
            other["alongside"].add(run["run_id"])
        placement = {"executor": "local", "parallel": len(self.slots), "slot": slot["slot"], "cpus": slot["cpus"],
                     "gpus": slot["gpus"]}
        environment = {PLACEMENT_ENV: json.dumps(placement)}
        if slot["gpus"] is not None:
            environment["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, slot["gpus"]))
        where = f" on cores {_span(slot['cpus'])}" + (f", GPU {_span(slot['gpus'])}" if slot["gpus"] else "")
        self.runner.announce(run, where)
        log_path = self.logs / f"{run['run_id']}.log"
        process = self.context.Process(target=job.run_in_slot, name=f"distcnn-{run['run_id']}", args=(
            json.dumps(config.model_dump(mode="json")), slot["cpus"], environment, str(log_path), os.getpid()))
        process.start()
        self.active[run["run_id"]] = {"run": run, "process": process, "slot": slot, "placement": placement,
                                      "started": time.perf_counter(), "log": log_path, "alongside": beside}

    def end(self, run_id: str) -> None:
        active = self.active.pop(run_id)
        run, code = active["run"], active["process"].exitcode
        seconds = time.perf_counter() - active["started"]
        self.store.set_placement(run_id, active["placement"] | {"alongside": sorted(active["alongside"])})
        if code != 0:
            self.runner.record_failure(run, f"{_last_line(active['log'])} (exit code {code}; log: "
                                            f"{active['log']})", seconds)
            return
        if not self.runner.record_from_disk(run, seconds):  # ended well, yet its record is elsewhere
            self.runner.record(run, None, seconds)


def _span(numbers: list[int]) -> str:
    """0-3 for a contiguous run of numbers, else 0,2."""
    if len(numbers) > 1 and numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}-{numbers[-1]}"
    return ",".join(map(str, numbers))


def _last_line(log: Path) -> str:
    """The run process's last words: its one-line error, or the end of a traceback."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "the run's process failed"
    return lines[-1].removeprefix("distcnn: ") if lines else "the run's process failed without a word"
