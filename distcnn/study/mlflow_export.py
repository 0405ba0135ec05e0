"""`distcnn export RUN_OR_STUDY --mlflow URI`: runs into an MLflow tracking store, for teams that compare runs
there.

Each finished distcnn run becomes one MLflow run: its config (and a study run's factor levels, seed and
replicate) as params; each epochs.csv column as the metric `epoch/<column>` with step = epoch; each summary
figure as `summary/<name>` (the names `--tensorboard` uses); config.json, summary.json, epochs.csv and
environment.json as artifacts. A study's runs are nested under one parent run named after the study, in an
experiment of that name (`--experiment` to choose another).

Nothing is doubled: every MLflow run carries the tag `distcnn.key` (the run's or the study's directory and run
id) and `distcnn.fingerprint` (a hash of what was logged). Exporting again skips a run whose record is
unchanged; one whose record changed (a run trained again into the same folder) replaces its earlier MLflow run,
which is deleted. A study run that is not done yet is left out and exported by a later export.

MLflow is optional (`pip install 'distcnn[mlflow]'`: mlflow-skinny, plus SQLAlchemy and alembic for a local
`sqlite:///` store) and imported only here, only when asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distcnn.errors import UsageError
from distcnn.record import CONFIG, ENVIRONMENT, EPOCHS, SUMMARY, RunRecord, read_object
from distcnn.study.store import DATABASE, flatten_summary, open_study, option_name, run_directory

INSTALL = "pip install 'distcnn[mlflow]'"
KEY, FINGERPRINT = "distcnn.key", "distcnn.fingerprint"
ARTIFACTS = (CONFIG, SUMMARY, EPOCHS, ENVIRONMENT)
MAX_PARAM_LENGTH = 6000  # MLflow refuses longer param values
BATCH = {"params": 100, "metrics": 1000}  # MLflow's limits for one log_batch call


@dataclass
class Source:
    """One finished distcnn run, as it is logged."""

    key: str
    name: str
    directory: Path | None  # its run record, when it is there
    summary: dict
    params: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)
    start_ms: int | None = None
    end_ms: int | None = None

    def epochs(self) -> list[dict]:
        return RunRecord(self.directory).read_epochs() if self.directory else []

    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps([self.summary, self.params], sort_keys=True, default=str).encode())
        if self.directory and (self.directory / EPOCHS).exists():
            digest.update((self.directory / EPOCHS).read_bytes())
        return digest.hexdigest()[:16]


# ---- what a run or a study directory holds -------------------------------------------------------------------

def sources(target: Path) -> tuple[dict | None, list[Source], int]:
    """(the study's spec or None for a single run, its finished runs, how many runs are not finished)."""
    if not target.is_dir():
        raise UsageError(f"no such directory: {target}")
    if (target / DATABASE).exists():
        return study_sources(target)
    record = RunRecord(target)
    if not record.finished:
        what = "has not finished (no summary.json yet)" if record.path(CONFIG).exists() else \
            f"is neither a run directory (summary.json) nor a study directory ({DATABASE})"
        raise UsageError(f"{target} {what}")
    summary = record.read_summary()
    config = read_object(record.path(CONFIG)) or {}
    source = Source(key=f"run:{target.resolve()}", name=str(summary.get("name") or target.name), directory=target,
                    summary=summary, params=config, start_ms=mtime_ms(record.path(CONFIG)),
                    end_ms=mtime_ms(record.path(SUMMARY)))
    return None, [source], 0


def study_sources(study_dir: Path) -> tuple[dict, list[Source], int]:
    store = open_study(study_dir)
    try:
        spec, runs = store.spec(), store.runs()
    finally:
        store.close()
    name = spec.get("name") or study_dir.name
    found, unfinished = [], 0
    for run in runs:
        if run["status"] != "done":
            unfinished += 1
            continue
        directory = run_directory(study_dir, run["run_id"], run["run_dir"])
        directory = directory if directory.is_dir() else None  # moved away or deleted: the summary is in study.db
        config = (read_object(directory / CONFIG) or {}) if directory else {}
        summary = run["summary"] or (read_object(directory / SUMMARY) if directory else None) or {}
        levels = {f"factor.{option_name(factor)}": level for factor, level in run["levels"].items()}
        found.append(Source(
            key=f"study:{study_dir.resolve()}#{run['run_id']}", name=run["run_id"], directory=directory,
            summary=summary, params=config | levels | {"seed": run["seed"], "replicate": run["replicate"]},
            tags={"distcnn.study": name, "distcnn.run_id": run["run_id"]},
            start_ms=seconds_ms(run["started_at"]), end_ms=seconds_ms(run["finished_at"])))
    return spec | {"name": name}, found, unfinished


def mtime_ms(path: Path) -> int | None:
    return int(path.stat().st_mtime * 1000) if path.exists() else None


def seconds_ms(seconds: float | None) -> int | None:
    return int(seconds * 1000) if seconds is not None else None


# ---- what is logged ------------------------------------------------------------------------------------------

def param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:MAX_PARAM_LENGTH]


def number(value: Any) -> float | None:
    """A figure MLflow can log as a metric (True/False and words are not), or None."""
    if isinstance(value, bool) or value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def metrics(source: Source, metric_type) -> list:
    """Every epochs.csv column as `epoch/<column>` (step = epoch), every summary figure as `summary/<name>`."""
    end = source.end_ms or 0
    logged, elapsed = [], 0.0
    for row in source.epochs():
        epoch = int(row["epoch"])
        elapsed += number(row.get("epoch_seconds")) or 0.0
        stamp = int(source.start_ms + elapsed * 1000) if source.start_ms and elapsed else end
        for column, cell in row.items():
            value = number(cell)
            if column != "epoch" and value is not None:
                logged.append(metric_type(f"epoch/{column}", value, stamp, epoch))
    for name, figure in flatten_summary(source.summary).items():
        value = number(figure) if not isinstance(figure, str) else None
        if value is not None and not math.isinf(value):
            logged.append(metric_type(f"summary/{name}", value, end, 0))
    return logged


# ---- the store -----------------------------------------------------------------------------------------------

def import_client():
    """MlflowClient, or the one line that says how to install it."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UsageError(f"--mlflow needs MLflow, an optional extra: {INSTALL}") from None
    for name in ("mlflow", "alembic"):  # creating a new store's tables is no news for the user
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient


def local_store(uri: str) -> tuple[str, Path | None]:
    """('sqlite', its database file) or ('file', its folder) for a local store; ('', None) for any other."""
    if not uri.strip():
        raise UsageError("--mlflow: give a tracking URI, e.g. sqlite:///mlflow.db")
    if uri.startswith("sqlite:"):
        if not uri.startswith("sqlite:///") or uri == "sqlite:///" or ":memory:" in uri:
            raise UsageError(f"--mlflow {uri}: give a database file, sqlite:///RELATIVE.db or sqlite:////ABSOLUTE.db")
        return "sqlite", Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("file:"):
        return "file", Path(uri.removeprefix("file:").removeprefix("//"))
    if "://" not in uri and ":" not in uri.split("/")[0]:
        return "file", Path(uri)
    return "", None


def connect(uri: str, experiment: str):
    """(client, experiment id): the experiment is made when the store lacks it, with a local sqlite store's
    artifacts in `mlartifacts/` beside the database (MLflow's default would be ./mlruns wherever you are)."""
    client_type = import_client()
    kind, path = local_store(uri)
    artifacts = None
    if kind == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
        raise UsageError(f"--mlflow {uri}: MLflow 3 keeps a file store only with MLFLOW_ALLOW_FILE_STORE=true; "
                         f"set it, or use a database such as sqlite:///mlflow.db")
    if kind == "sqlite":
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"--mlflow {uri}: cannot create {path.parent}: {error.strerror}") from None
        artifacts = (path.parent.resolve() / "mlartifacts").as_uri()
    try:
        client = client_type(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return client, client.create_experiment(experiment, artifact_location=artifacts)
    except Exception as error:  # any failure to reach or open the store: the URI is the user's
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"--mlflow {uri}: {first}") from None
    if found.lifecycle_stage != "active":
        raise UsageError(f"MLflow experiment {experiment!r} is deleted in {uri}; restore it or give --experiment")
    return client, found.experiment_id


def logged_runs(client, experiment_id: str) -> dict[str, Any]:
    """The experiment's active MLflow runs that distcnn logged, by their distcnn.key."""
    found, token = {}, None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        found.update({run.data.tags[KEY]: run for run in page if KEY in run.data.tags})
        token = page.token
        if not token:
            return found


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    listed = [Param(name, param_text(value)) for name, value in params.items()]
    for start in range(0, len(listed), BATCH["params"]):
        client.log_batch(run_id, params=listed[start:start + BATCH["params"]])


def log_run(client, experiment_id: str, source: Source, parent_id: str | None) -> str:
    """One MLflow run for `source`; its distcnn.key is set last, so a run cut short is never taken as logged."""
    from mlflow.entities import Metric

    tags = source.tags | {"distcnn.run_dir": str(source.directory.resolve()) if source.directory else ""}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    run_id = client.create_run(experiment_id, start_time=source.start_ms, tags=tags, run_name=source.name).info.run_id
    try:
        log_params(client, run_id, source.params)
        logged = metrics(source, Metric)
        for start in range(0, len(logged), BATCH["metrics"]):
            client.log_batch(run_id, metrics=logged[start:start + BATCH["metrics"]])
        for name in ARTIFACTS:
            if source.directory and (source.directory / name).is_file():
                client.log_artifact(run_id, str(source.directory / name))
        client.set_terminated(run_id, "FINISHED", end_time=source.end_ms)
        client.set_tag(run_id, FINGERPRINT, source.fingerprint())
        client.set_tag(run_id, KEY, source.key)
    except BaseException:
        client.delete_run(run_id)
        raise
    return run_id


def study_parent(client, experiment_id: str, study_dir: Path, spec: dict, logged: dict) -> str:
    """The study's own MLflow run (made once): the study as params and as study.json."""
    key = f"study:{study_dir.resolve()}"
    if key in logged:
        return logged[key].info.run_id
    run_id = client.create_run(experiment_id, run_name=spec["name"],
                               tags={KEY: key, "distcnn.study": spec["name"]}).info.run_id
    params = {"design": spec.get("design"), "replicates": spec.get("replicates"), "seed": spec.get("seed"),
              "responses": spec.get("responses"), "factors": spec.get("factors")}
    params |= {f"base.{option_name(name)}": value for name, value in (spec.get("base") or {}).items()}
    log_params(client, run_id, params)
    client.log_dict(run_id, spec, "study.json")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def export_to_mlflow(target: str | Path, uri: str, experiment: str | None = None) -> dict[str, int]:
    """Log a run or a study directory into the MLflow store at `uri`; counts of runs 'logged', 'replaced',
    'unchanged' and 'unfinished' (left out), and the experiment's name."""
    target = Path(target)
    spec, found, unfinished = sources(target)
    name = experiment or (spec["name"] if spec else "distcnn")
    client, experiment_id = connect(uri, name)
    logged = logged_runs(client, experiment_id)
    parent = study_parent(client, experiment_id, target, spec, logged) if spec else None
    counts = Counter(unfinished=unfinished)
    for source in found:
        earlier = logged.get(source.key)
        if earlier is not None and earlier.data.tags.get(FINGERPRINT) == source.fingerprint():
            counts["unchanged"] += 1
            continue
        log_run(client, experiment_id, source, parent)
        if earlier is not None:
            client.delete_run(earlier.info.run_id)
        counts["replaced" if earlier is not None else "logged"] += 1
    return dict(counts) | {"experiment": name}


def describe_export(counts: dict, uri: str) -> str:
    logged = counts.get("logged", 0)
    parts = [f"{logged} run{'s' if logged != 1 else ''} logged"]
    parts += [f"{counts[key]} {key}" for key in ("replaced", "unchanged") if counts.get(key)]
    if counts.get("unfinished"):
        parts.append(f"{counts['unfinished']} not finished (left out)")
    return f"mlflow: {', '.join(parts)} — experiment {counts['experiment']!r} in {uri}"
