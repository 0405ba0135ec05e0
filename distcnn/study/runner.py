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
from distcnn.record import host_name
from distcnn.study.spec import StudySpec
from distcnn.study.store import DATABASE, StudyStore, option_name
from distcnn.units import duration

RUNS = "runs"


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
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out} is a file, not a directory")
        created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise filesystem_problem(error, "--out: cannot create the study directory") from None
        self.lock = DirectoryLock(self.out, "study").acquire()
        self.owner = f"{host_name()}:{os.getpid()}"
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
                loaded[key] = launch.validate(config, loaded.get(key))
            except UsageError as error:
                raise UsageError(f"configuration {describe(levels)}: {error}") from None

    def pending(self) -> list[dict]:
        """Interrupted runs always run again; failed ones while they have retries left."""
        def due(run: dict) -> bool:
            return run["status"] in ("pending", "running") or (
                run["status"] == "failed" and run["attempts"] <= self.retries)

        return [run for run in self.store.runs() if run["owner"] in (None, self.owner) and due(run)]

    def run(self) -> list[dict]:
        total = len(self.planned)
        durations: list[float] = []
        while todo := self.pending():
            for run in todo:
                done = sum(r["status"] == "done" for r in self.store.runs())
                mean = sum(durations) / len(durations) if durations else None
                eta = f", about {duration(mean * (total - done))} left" if mean is not None else ""
                say(f"── study {self.spec.name}: run {done + 1}/{total} {run['run_id']} {describe(run['levels'])} "
                    f"seed {run['seed']}{eta}")
                durations.append(self.run_one(run))
        return self.store.runs()

    def run_one(self, run: dict) -> float:
        config = self.config(run)
        if not self.store.claim(run["run_id"], Path(config.out), self.owner):
            say(f"   {run['run_id']} is done or taken by another runner; skipped")
            return 0.0
        started = time.perf_counter()
        try:
            summary = launch.run(config)
        except (UsageError, WorkersFailed, TrainingDiverged, RunInterrupted) as error:
            self.store.fail(run["run_id"], str(error), time.perf_counter() - started)
            say(f"   {run['run_id']} failed: {error}")
            return time.perf_counter() - started
        except Exception as error:  # noqa: BLE001 — one broken run must not end the study
            self.store.fail(run["run_id"], f"{type(error).__name__}: {error}", time.perf_counter() - started)
            say(f"   {run['run_id']} failed: {type(error).__name__}: {error}")
            return time.perf_counter() - started
        seconds = time.perf_counter() - started
        if summary is None:
            self.store.fail(run["run_id"], "no summary on this machine (another node holds rank 0)", seconds)
        else:
            self.store.finish(run["run_id"], summary, seconds)
            figures = ", ".join(f"{r} {summary.get(r):.4g}" for r in self.spec.responses
                                if isinstance(summary.get(r), (int, float)))
            say(f"   {run['run_id']} done in {seconds:.0f} s: {figures}")
        return seconds

    def close(self) -> None:
        self.store.close()
        self.lock.release()
