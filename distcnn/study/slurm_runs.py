"""The study process's side of `--executor slurm`: submit the pending runs (a job array per set of runs that
share their resources), keep each job id in study.db at once, watch the jobs, and record each run when its job
ends: done with the summary its job wrote into the run directory, or failed with Slurm's state and the log's
last lines (retried up to --retries times, as a failed local run is).

A study process that was killed and is started again re-attaches to the jobs it finds in study.db instead of
submitting them again; the jobs ran on without it. A job submitted twice for one run (the study was killed in
the moment between sbatch and recording its id) is found by the job name recorded before sbatch (each
submission has its own) and attached, not submitted again.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

from distcnn.console import say
from distcnn.errors import UsageError
from distcnn.study import job as run_job
from distcnn.study import slurm

SETTLE_S = 15.0  # how long a job whose result is written may still show as running before it is recorded
TRACE_RULE = "----------------------\n"  # what submitit sets around a failed job's trace


class SlurmRuns:
    def __init__(self, runner):
        slurm.check_available()
        import submitit

        self.submitit = submitit
        self.runner, self.store, self.spec = runner, runner.store, runner.spec
        self.folder = slurm.folder(runner.out)
        self.poll = float(self.spec.slurm.get("poll_seconds", slurm.DEFAULT_POLL_SECONDS))
        self.active: dict[str, dict] = {}  # run_id -> its job, run and when it was submitted (or adopted)

    def run(self) -> None:
        while todo := self.runner.pending():
            todo = self.found([run for run in todo if run["status"] == "running" and not run["job_id"]
                               and run["job_name"]]) or todo
            self.attach([run for run in todo if run["status"] == "running" and run["job_id"]])
            self.submit([run for run in todo if not (run["status"] == "running" and run["job_id"])])
            while self.active:
                time.sleep(self.poll)
                self.check()

    # ---- submitting and re-attaching ---------------------------------------------------------------------

    def attach(self, runs: list[dict]) -> None:
        """Jobs a previous study process submitted: watched again, never submitted again."""
        for run in runs:
            if not self.store.adopt(run["run_id"], self.runner.owner):
                continue
            config = self.runner.config(run)
            job = self.submitit.SlurmJob(folder=self.folder, job_id=run["job_id"],
                                         tasks=tuple(range(config.nnodes)))
            say(f"   {run['run_id']}: re-attached to Slurm job {run['job_id']} ({run['job_state'] or 'submitted'})")
            self.active[run["run_id"]] = {"run": run, "job": job, "since": time.perf_counter(),
                                          "state": run["job_state"]}

    def found(self, runs: list[dict]) -> list[dict]:
        """Runs a killed study process submitted without recording their job ids: looked up in Slurm by the
        job name recorded before sbatch; those found get their ids (and are attached, not submitted again).
        The runs pending now, read again ([] when there were none to look up)."""
        jobs = {}
        for run in runs:
            name, _, task = run["job_name"].partition("#")
            base = slurm.job_named(name)
            if base is not None:
                jobs[run["run_id"]] = f"{base}_{task}" if task else base
                say(f"   {run['run_id']}: found its Slurm job {jobs[run['run_id']]} by name ({name})")
        if not runs:
            return []
        if jobs:
            self.store.set_jobs(jobs)
        return self.runner.pending()

    def submit(self, runs: list[dict]) -> None:
        """Claim the runs, submit them (one array per set of runs with the same resources), record the ids."""
        groups: dict[str, list[tuple[dict, dict]]] = {}
        for run in runs:
            config = self.runner.config(run)
            if not self.store.claim(run["run_id"], Path(config.out), self.runner.owner):
                say(f"   {run['run_id']} is done or taken by another runner; skipped")
                continue
            parameters = slurm.job_parameters(self.spec.slurm, config, f"distcnn-{self.spec.name}")
            key = json.dumps(parameters, sort_keys=True)
            groups.setdefault(key, []).append((run, config.model_dump(mode="json")))
        for key, members in groups.items():
            executor = self.submitit.SlurmExecutor(folder=self.folder, max_num_timeout=0)
            # a name of its own per submission, recorded before sbatch: a restarted study finds the job by it
            name = f"distcnn-{self.spec.name}-{uuid.uuid4().hex[:8]}"
            executor.update_parameters(**json.loads(key) | {"job_name": name})
            self.store.mark_submitting({run["run_id"]: f"{name}#{index if len(members) > 1 else ''}"
                                        for index, (run, _) in enumerate(members)})
            try:
                if len(members) == 1:
                    jobs = [executor.submit(run_job.run, members[0][1])]
                else:
                    with executor.batch():
                        jobs = [executor.submit(run_job.run, options) for _, options in members]
            except Exception as error:  # noqa: BLE001 — sbatch refused: a partition, account or limit
                self.store.unclaim([run["run_id"] for run, _ in members])
                raise UsageError(f"sbatch refused the study's jobs: {_first_line(error)}") from None
            self.store.set_jobs({run["run_id"]: job.job_id for (run, _), job in zip(members, jobs)})
            array = f" (job array {jobs[0].job_id.split('_')[0]})" if len(jobs) > 1 else ""
            say(f"── study {self.spec.name}: submitted {len(jobs)} run(s) to Slurm{array}: "
                + ", ".join(f"{run['run_id']}={job.job_id}" for (run, _), job in zip(members, jobs)))
            for (run, _), job in zip(members, jobs):
                self.active[run["run_id"]] = {"run": run, "job": job, "since": time.perf_counter(),
                                              "state": "SUBMITTED"}

    # ---- watching ------------------------------------------------------------------------------------------

    def check(self) -> None:
        """One sacct call for every job, then each job that ended is recorded."""
        self.submitit.SlurmJob.watcher.update()
        for run_id, active in list(self.active.items()):
            job = active["job"]
            state = job.watcher.get_state(job.job_id, mode="cache")
            if state != active["state"]:
                active["state"] = state
                self.store.set_job_state(run_id, state)
            if job.done() and self.settled(active, state):
                del self.active[run_id]
                self.end(active, state)

    def settled(self, active: dict, state: str) -> bool:
        """A job whose result is written is recorded once Slurm says how it ended (COMPLETED, FAILED,
        NODE_FAIL ...), not with the RUNNING or COMPLETING Slurm still shows while its step winds down; after
        SETTLE_S, or where Slurm cannot tell (UNKNOWN: no accounting), with what it says then."""
        if state == "UNKNOWN" or state not in slurm.RUNNING_STATES:
            return True
        return time.perf_counter() - active.setdefault("done_at", time.perf_counter()) > SETTLE_S

    def end(self, active: dict, state: str) -> None:
        run, job = active["run"], active["job"]
        seconds = time.perf_counter() - active["since"]
        self.store.set_placement(run["run_id"], {"executor": "slurm", "job_id": job.job_id, "state": state})
        if self.runner.record_from_disk(run, seconds):
            return
        # The job's own error where its function raised (submitit pickled it), else the end of its log.
        errors = [error for task in _written(job) if (error := task.exception()) is not None]
        why = _first_line(errors[0]) if errors else slurm.log_tail(job)
        self.runner.record_failure(run, f"Slurm job {job.job_id} {state}: {why}", seconds)


def _written(job) -> list:
    """The job's tasks that wrote their result. Only those are asked for their error: submitit waits 15 s for
    the result of a task that never wrote one, and a task on a node that died never does."""
    tasks = getattr(job, "_sub_jobs", None) or [job]
    return [task for task in tasks if task.paths.result_pickle.exists()]


def _first_line(error) -> str:
    """The line of an error that says what went wrong. A job's (submitit sets its trace between two rules):
    the exception's own line, the trace's last, `module.Name: message` as `Name: message`, not the traceback
    or submitit's pointers to the logs. Any other (sbatch's refusal): the last line that names an error."""
    parts = str(error or "").split(TRACE_RULE)
    traced = len(parts) >= 3
    lines = [line.strip() for line in (parts[1] if traced else parts[0]).splitlines() if line.strip()]
    if traced and lines:
        return re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*: )", "", lines[-1])
    named = [line for line in lines if "Error:" in line or "error:" in line]
    return (named or lines or ["no output"])[-1]
