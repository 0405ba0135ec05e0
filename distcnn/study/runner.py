"""Running a study: expand the design, randomise the run order, run each run through the same launcher as
`distcnn train`, and record each one in study.db as it ends.

Running the same command again resumes: done runs are skipped; a run that was interrupted (the study was
killed) runs again, resuming its own checkpoint; a failed one runs again up to --retries times, then stays
failed with its error while the study goes on.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

from distcnn import launch
from distcnn.console import say
from distcnn.errors import RunInterrupted, TrainingDiverged, UsageError, WorkersFailed
from distcnn.ownership import DirectoryLock, filesystem_problem
from distcnn.record import RunRecord, host_name
from distcnn.study.spec import StudySpec
from distcnn.study.store import DATABASE, RUNS, StudyStore, option_name
from distcnn.units import duration



def plan_runs(spec: StudySpec) -> list[dict]:
    """Every configuration × replicate with its seed, in a randomised (seeded) order, as design asks:
    drifts of the machine then spread over the factors instead of following the order of the levels."""
    planned = []
    for index, levels in enumerate(spec.configurations()):
        for replicate in range(1, spec.replicates + 1):
            # Replicate r uses the same seed in every configuration: configurations differ only by their factors.
            planned.append({"run_id": f"c{index:02d}-r{replicate}", "config_index": index, "replicate": replicate,
                            "seed": spec.seed + replicate - 1, "levels": levels})
    order = list(range(len(planned)))
    random.Random(spec.seed).shuffle(order)
    for position, run in zip(order, planned):
        run["run_order"] = position
    return sorted(planned, key=lambda run: run["run_order"])


def describe(levels: dict) -> str:
    return " ".join(f"{option_name(name)}={value}" for name, value in levels.items())


class StudyRunner:
    """One study process per study directory: it holds the directory's lock for its life, so a second runner
    on the same directory is refused (one line naming the holder), and every run it trains it first claims in
    study.db, in one transaction."""

    def __init__(self, spec: StudySpec, out: Path, retries: int = 1):
        self.spec, self.out, self.retries = spec, Path(out), retries
        self.planned = plan_runs(spec)
        self.durations: list[float] = []  # of the runs ended in this process: the time left
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out} is a file, not a directory")
        created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise filesystem_problem(error, "--out: cannot create the study directory") from None
        self.lock = DirectoryLock(self.out, "study").acquire()
        self.owner = f"{host_name()}:{os.getpid()}"
        if spec.executor == "local" and spec.parallel > 1:
            from distcnn.study.side_by_side import start_fork_server

            start_fork_server()  # its imports overlap the checks below
        try:
            self.check_configurations()
            self.store = StudyStore(self.out / DATABASE)
            self.store.begin(spec.as_dict(), self.planned)
            self.store.release_claims()
        except BaseException:
            if hasattr(self, "store"):
                self.store.close()
            self.lock.release()
            if created:  # nothing half-written: a refused study leaves no folder behind
                shutil.rmtree(self.out, ignore_errors=True)
            raise

    def config(self, run: dict):
        return self.spec.run_config(run["levels"], run["seed"], self.out / RUNS / run["run_id"], run["run_id"])

    def check_configurations(self) -> None:
        """Data, model, augmentation of every configuration checked before the first run starts."""
        loaded = {}  # data options -> splits: the data is loaded once, not once per configuration
        for levels in self.spec.configurations():
            config = self.spec.run_config(levels, self.spec.seed, self.out / RUNS / "check", "check")
            key = launch.data_options(config)
            try:
                # Slurm runs on other machines: what this one has (GPUs, cores) is no check of theirs.
                loaded[key] = launch.validate(config, loaded.get(key),
                                              on_this_machine=self.spec.executor == "local")
            except UsageError as error:
                raise UsageError(f"configuration {describe(levels)}: {error}") from None

    def pending(self) -> list[dict]:
        """Interrupted runs always run again; failed ones while they have retries left."""
        def due(run: dict) -> bool:
            return run["status"] in ("pending", "running") or (
                run["status"] == "failed" and run["attempts"] <= self.retries)

        return [run for run in self.store.runs() if run["owner"] in (None, self.owner) and due(run)]

    def run(self) -> list[dict]:
        """Every pending run, by the study's executor: one after another here, several at once here
        (--parallel N), or as Slurm jobs."""
        if self.spec.executor == "slurm":
            from distcnn.study.slurm_runs import SlurmRuns

            SlurmRuns(self).run()
        elif self.spec.parallel > 1:
            from distcnn.study.side_by_side import SideBySide

            SideBySide(self).run()
        else:
            while todo := self.pending():
                for run in todo:
                    self.run_one(run)
        return self.store.runs()

    def announce(self, run: dict, where: str = "") -> None:
        """The line that starts a run: its place in the study, its configuration, and the time left."""
        total = len(self.planned)
        done = sum(r["status"] == "done" for r in self.store.runs())
        mean = sum(self.durations) / len(self.durations) if self.durations else None
        left = mean * (total - done) / max(1, self.spec.parallel) if mean is not None else None
        eta = f", about {duration(left)} left" if left is not None and self.spec.executor == "local" else ""
        say(f"── study {self.spec.name}: run {done + 1}/{total} {run['run_id']} {describe(run['levels'])} "
            f"seed {run['seed']}{where}{eta}")

    def run_one(self, run: dict) -> None:
        config = self.config(run)
        if not self.store.claim(run["run_id"], Path(config.out), self.owner):
            say(f"   {run['run_id']} is done or taken by another runner; skipped")
            return
        self.announce(run)
        started = time.perf_counter()
        try:
            summary = launch.run(config)
        except (UsageError, WorkersFailed, TrainingDiverged, RunInterrupted) as error:
            self.record_failure(run, str(error), time.perf_counter() - started)
            return
        except Exception as error:  # noqa: BLE001 — one broken run must not end the study
            self.record_failure(run, f"{type(error).__name__}: {error}", time.perf_counter() - started)
            return
        self.record(run, summary, time.perf_counter() - started)

    def record(self, run: dict, summary: dict | None, seconds: float) -> None:
        """A run that ended: done with its summary, once (or failed, when no summary reached this machine)."""
        self.durations.append(seconds)
        if summary is None:
            self.store.fail(run["run_id"], "no summary on this machine (another node holds rank 0)", seconds)
            return
        self.store.finish(run["run_id"], summary, seconds)
        figures = ", ".join(f"{r} {summary.get(r):.4g}" for r in self.spec.responses
                            if isinstance(summary.get(r), (int, float)))
        say(f"   {run['run_id']} done in {seconds:.0f} s: {figures}")

    def record_from_disk(self, run: dict, seconds: float) -> bool:
        """A run whose own process or job ended: recorded from its run directory as done (the summary it
        wrote) or failed (it diverged). False when the directory holds no finished run."""
        config = self.config(run)
        record = RunRecord(config.out)
        if not record.finished:
            return False
        try:
            self.record(run, launch.finished_summary(config, record), seconds)
        except TrainingDiverged as error:
            self.record_failure(run, str(error), seconds)
        return True

    def record_failure(self, run: dict, error: str, seconds: float) -> None:
        self.durations.append(seconds)
        self.store.fail(run["run_id"], error, seconds)
        say(f"   {run['run_id']} failed: {error}")

    def close(self) -> None:
        self.store.close()
        self.lock.release()


def run_study(spec: StudySpec, out: Path, retries: int = 1, before_runs=None) -> list[dict] | None:
    """Run (or resume) a study into `out`, the one way both doors do it: `retries` checked, the directory owned
    for the whole of it and released however it ends. `before_runs(spec, out)`, once the study is checked and
    owned (a forecast, say), may return True to stop there (then None is returned)."""
    if retries < 0:
        raise UsageError(f"retries (--retries) must be 0 or more, got {retries}")
    runner = StudyRunner(spec, out, retries)  # checks every configuration, owns the study directory
    try:
        if before_runs is not None and before_runs(spec, out):
            return None
        return runner.run()
    finally:
        runner.close()


def status_lines(out: Path) -> list[str]:
    """`distcnn study FILE --status`: each run's state, attempts, Slurm job (id and state) and error."""
    from distcnn.study.store import open_study

    store = open_study(out)
    try:
        runs = store.runs()
    finally:
        store.close()
    counts = {status: sum(run["status"] == status for run in runs) for status in ("done", "running", "failed")}
    lines = [f"{out}: {len(runs)} runs, " + ", ".join(f"{n} {status}" for status, n in counts.items())
             + f", {len(runs) - sum(counts.values())} pending"]
    lines.append(f"{'run':<8} {'status':<8} {'tries':>5}  {'job':<12} {'job state':<11} configuration")
    for run in runs:
        job = run["job_id"] or "-"
        line = (f"{run['run_id']:<8} {run['status']:<8} {run['attempts']:>5}  {job:<12} "
                f"{run['job_state'] or '-':<11} {describe(run['levels'])} seed {run['seed']}")
        if run["status"] == "failed" and run["error"]:
            line += f"\n{'':<8} {run['error']}"
        lines.append(line)
    return lines
