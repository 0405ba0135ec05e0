"""The study database, DIR/study.db: one row per configuration × replicate, committed atomically.

    study(key, value)      the study as run (JSON), so a resumed study is checked against it
    runs(run_id, ...)      levels, seed, order, status (pending | running | done | failed), attempts, times,
                           the summary figures and the path of the run record

A run becomes `done` in one transaction together with its summary, and only if it was not done already:
running the study again skips it, and nothing is ever recorded twice.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from distcnn import summary as declared
from distcnn.config import flag
from distcnn.errors import UsageError

DATABASE = "study.db"
STATUSES = ("pending", "running", "done", "failed")

# Summary figures a study can take as responses: declared in distcnn.summary (numbers; the step breakdown
# flattened as step_<phase>_s, a CNN-DNN's aggregators as <aggregator>_test_accuracy, each shifted test set as
# shift_<name>_accuracy: its mean over the severities).
KNOWN_RESPONSES = declared.RESPONSES


def is_known_response(name: str) -> bool:
    return declared.is_response(name)


def flatten_summary(summary: dict) -> dict[str, Any]:
    """The scalar figures of a summary, with its nested figures as the columns distcnn.summary.DERIVED
    declares (step_<phase>_s, <aggregator>_test_accuracy, local_phase_seconds, shift_<name>_accuracy, ...)."""
    flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}
    for phase, seconds in (summary.get("step_time_breakdown") or {}).items():
        flat[declared.STEP.column(phase=phase)] = seconds
    for name, figures in (summary.get("aggregators") or {}).items():  # a CNN-DNN's dnn, mean and vote
        flat[declared.AGGREGATOR_ACCURACY.column(aggregator=name)] = figures.get("test_accuracy")
    local = (summary.get("phases") or {}).get("local")
    if local:
        flat[declared.LOCAL_PHASE.name] = local.get("seconds")
    for name, by_severity in (summary.get("shift_accuracy") or {}).items():  # shift_<name>_accuracy: mean
        values = [value for value in by_severity.values() if value is not None]
        flat[declared.SHIFT.column(name=name)] = sum(values) / len(values) if values else None
        for severity, value in by_severity.items():
            flat[declared.SHIFT_SEVERITY.column(name=name, severity=severity)] = value
    if "shifts_in_training" in summary:
        flat["shifts_in_training"] = ",".join(summary["shifts_in_training"])
    return flat


SCHEMA = """
CREATE TABLE IF NOT EXISTS study (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    config_index INTEGER NOT NULL,
    replicate INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    run_order INTEGER NOT NULL,
    levels TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    finished_at REAL,
    seconds REAL,
    run_dir TEXT,
    error TEXT,
    summary TEXT,
    owner TEXT,
    job_id TEXT,
    job_state TEXT,
    placement TEXT,
    job_name TEXT
);
"""

RUNS = "runs"  # a study's run records: STUDY_DIR/runs/<run_id>

class StudyStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # explicit transactions below
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(runs)")}
            for column in ("owner", "job_id", "job_state", "placement", "job_name"):  # (written before they existed)
                if column not in columns:
                    self.db.execute(f"ALTER TABLE runs ADD COLUMN {column} TEXT")
        except sqlite3.DatabaseError as error:  # not a database, or one cut short or overwritten
            self.db.close()
            raise damaged_database(self.path, error) from None

    def close(self) -> None:
        self.db.close()

    def _write(self, sql: str, parameters=()) -> int:
        with self.db:  # one transaction: committed whole or not at all
            self.db.execute("BEGIN IMMEDIATE")
            return self.db.execute(sql, parameters).rowcount

    def begin(self, spec: dict, planned: list[dict]) -> None:
        """Record the study and its runs; a study directory already holding another study is refused."""
        row = self.db.execute("SELECT value FROM study WHERE key = 'spec'").fetchone()
        if row is not None:
            saved = json.loads(row[0])
            if {k: v for k, v in saved.items() if k != "name"} != {k: v for k, v in spec.items() if k != "name"}:
                raise UsageError(f"{self.path.parent} holds another study (other options, factors or replicates); "
                                 f"choose another --out")
            return
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT INTO study VALUES ('spec', ?)", (json.dumps(spec),))
            self.db.executemany(
                "INSERT INTO runs (run_id, config_index, replicate, seed, run_order, levels) VALUES (?, ?, ?, ?, ?, ?)",
                [(p["run_id"], p["config_index"], p["replicate"], p["seed"], p["run_order"], json.dumps(p["levels"]))
                 for p in planned])

    def runs(self) -> list[dict]:
        rows = self.db.execute("SELECT * FROM runs ORDER BY run_order").fetchall()
        return [_as_dict(row) for row in rows]

    def release_claims(self) -> int:
        """Forget the claims of runners that are gone; only the runner holding the study's lock calls this, so
        every claim it finds was left by a dead process (its run was interrupted and runs again)."""
        return self._write("UPDATE runs SET owner = NULL WHERE owner IS NOT NULL")

    def claim(self, run_id: str, run_dir: Path, owner: str) -> bool:
        """Take a run to train it, in one transaction: False when it is done or another runner holds it, so no
        two processes ever train the same run."""
        return self._write("UPDATE runs SET status = 'running', attempts = attempts + 1, started_at = ?, "
                           "run_dir = ?, error = NULL, owner = ?, job_id = NULL, job_state = NULL, job_name = NULL "
                           "WHERE run_id = ? AND status != 'done' "
                           "AND owner IS NULL", (time.time(), str(run_dir), owner, run_id)) == 1

    def unclaim(self, run_ids: list[str]) -> None:
        """Runs claimed for a submission that Slurm refused: pending again, the attempt not counted."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("UPDATE runs SET status = 'pending', attempts = attempts - 1, owner = NULL "
                                "WHERE run_id = ? AND status = 'running'", [(run_id,) for run_id in run_ids])

    def adopt(self, run_id: str, owner: str) -> bool:
        """Take over a run whose Slurm job was submitted by a study process that is gone: its job goes on, and
        this process records it (nothing is submitted again)."""
        return self._write("UPDATE runs SET owner = ? WHERE run_id = ? AND status = 'running' AND owner IS NULL "
                           "AND job_id IS NOT NULL", (owner, run_id)) == 1

    def mark_submitting(self, names: dict[str, str]) -> None:
        """Before sbatch: each run's job as Slurm will name it ("NAME#TASK", TASK empty for a job of its own),
        so that a study process killed between sbatch and set_jobs finds the job by name (SlurmRuns.found)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("UPDATE runs SET job_name = ? WHERE run_id = ?",
                                [(name, run_id) for run_id, name in names.items()])

    def set_jobs(self, jobs: dict[str, str]) -> None:
        """The Slurm job id of each run just submitted, in one transaction."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("UPDATE runs SET job_id = ?, job_state = 'SUBMITTED' WHERE run_id = ?",
                                [(job_id, run_id) for run_id, job_id in jobs.items()])

    def set_job_state(self, run_id: str, state: str) -> None:
        self._write("UPDATE runs SET job_state = ? WHERE run_id = ?", (state, run_id))

    def set_placement(self, run_id: str, placement: dict) -> None:
        """Where the run ran, and beside which runs: figures of runs that shared a machine are not comparable
        to those of runs that ran alone."""
        self._write("UPDATE runs SET placement = ? WHERE run_id = ?", (json.dumps(placement), run_id))

    def finish(self, run_id: str, summary: dict, seconds: float) -> bool:
        """Mark done with its summary — once: False when it was already done."""
        return self._write("UPDATE runs SET status = 'done', finished_at = ?, seconds = ?, summary = ?, "
                           "owner = NULL WHERE run_id = ? AND status != 'done'",
                           (time.time(), seconds, json.dumps(summary), run_id)) == 1

    def fail(self, run_id: str, error: str, seconds: float) -> None:
        self._write("UPDATE runs SET status = 'failed', finished_at = ?, seconds = ?, error = ?, owner = NULL "
                    "WHERE run_id = ? AND status != 'done'", (time.time(), seconds, error, run_id))

    def spec(self) -> dict:
        row = self.db.execute("SELECT value FROM study WHERE key = 'spec'").fetchone()
        return json.loads(row[0]) if row else {}


def _as_dict(row: sqlite3.Row) -> dict:
    record = dict(row)
    record["levels"] = json.loads(record["levels"])
    record["summary"] = json.loads(record["summary"]) if record["summary"] else None
    record["placement"] = json.loads(record["placement"]) if record.get("placement") else None
    return record


def option_name(field_name: str) -> str:
    """A factor as people write it (`train-subset`: its flag without the dashes), in the table, the analysis
    and the report."""
    return flag(field_name).removeprefix("--")


def run_directory(study_dir: str | Path, run_id: str, recorded: str | None) -> Path:
    """Where the study wrote a run's record (`recorded`, study.db's run_dir); under the study directory,
    STUDY_DIR/runs/<run_id>, when the study was moved (or the run has not started)."""
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    return Path(study_dir) / RUNS / run_id


def runs_alongside(run: dict) -> int:
    """How many other runs shared the machine with this one (--parallel); 0: it ran alone."""
    return len((run.get("placement") or {}).get("alongside", []))


def damaged_database(path: Path, error: sqlite3.DatabaseError) -> UsageError:
    """A study.db that cannot be read, as one line: what it is, and what to do. Each finished run's own
    record (its summary.json) is not in study.db, so moving the file away loses no training: run the study
    again and the runs it planned are found finished in their directories."""
    return UsageError(f"{path} is damaged ({error}); move it away (e.g. to {path.name}.damaged) and run the "
                      f"study again: its finished runs keep their records and are not trained again")


def open_study(study_dir: str | Path) -> StudyStore:
    path = Path(study_dir) / DATABASE
    if not path.exists():
        raise UsageError(f"not a study directory: no {DATABASE} in {study_dir}")
    return StudyStore(path)


def load_runs_table(study_dir: str | Path) -> tuple[list[dict], dict[str, list]]:
    """The finished runs as flat rows (factor levels, replicate, seed, run_id, summary figures) and each
    factor's levels in the order of the study file — what the analysis and the report read."""
    store = open_study(study_dir)
    try:
        spec = store.spec()
        rows = []
        for run in store.runs():
            if run["status"] != "done":
                continue
            row = flatten_summary(run["summary"] or {})
            row.update({option_name(name): level for name, level in run["levels"].items()})
            row.update(run_id=run["run_id"], replicate=run["replicate"], seed=run["seed"],
                       run_dir=run["run_dir"], run_seconds=run["seconds"],
                       runs_alongside=runs_alongside(run))
            rows.append(row)
        return rows, {option_name(name): levels for name, levels in spec.get("factors", {}).items()}
    finally:
        store.close()
