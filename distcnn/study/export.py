"""`distcnn export STUDY_DIR --csv FILE`: every run of a study as one flat table, for tools that do not read
study.db (a spreadsheet, R, pandas elsewhere). `--mlflow URI` logs a run or a study into an MLflow tracking store
instead (or as well): distcnn.study.mlflow_export.

Unlike the analysis table (finished runs only) this holds every run with its status, attempts and error, so a
failed or pending run is visible too. Columns: run_id, the factors, the bookkeeping, the study's responses,
then every other summary figure sorted by name; a figure a run lacks is an empty cell.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from distcnn.errors import UsageError
from distcnn.record import write_atomic
from distcnn.study.store import flatten_summary, open_study, option_name, runs_alongside

BOOKKEEPING = ("replicate", "seed", "status", "attempts", "seconds", "error", "run_dir", "job_id", "job_state")


def export_rows(study_dir: str | Path) -> tuple[list[dict], list[str]]:
    """One flat row per run (bookkeeping over a summary figure of the same name: the run's seed is the
    study's), and the columns in their stable order."""
    store = open_study(study_dir)
    try:
        spec, runs = store.spec(), store.runs()
    finally:
        store.close()
    factors = [option_name(name) for name in spec.get("factors", {})]
    rows = []
    for run in runs:
        row = flatten_summary(run["summary"] or {})
        row.update({option_name(name): level for name, level in run["levels"].items()})
        row.update({"run_id": run["run_id"]} | {key: run[key] for key in BOOKKEEPING})
        row["runs_alongside"] = runs_alongside(run)
        rows.append(row)
    fixed = ["run_id", *factors, *BOOKKEEPING, "runs_alongside"]
    responses = [name for name in spec.get("responses", []) if name not in fixed]
    taken = set(fixed) | set(responses)
    rest = sorted({key for row in rows for key in row} - taken)
    return rows, fixed + responses + rest


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    def write(handle) -> None:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)

    write_atomic(path, write)


def require_pyarrow() -> None:
    """Checked before any file is written: a missing optional dependency is the user's one line."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UsageError("writing Parquet needs pyarrow (pip install pyarrow); or use --csv FILE") from None


def write_parquet(path: Path, rows: list[dict], columns: list[str]) -> None:
    import pandas as pd

    table = pd.DataFrame(rows, columns=columns)
    write_atomic(path, lambda handle: table.to_parquet(handle, index=False), binary=True)


def command_export(args: argparse.Namespace) -> int:
    mlflow = getattr(args, "mlflow", None)
    if args.csv is None and args.parquet is None and mlflow is None:
        raise UsageError("distcnn export: give --csv FILE or --parquet FILE (or both), or --mlflow URI")
    if getattr(args, "experiment", None) is not None and mlflow is None:
        raise UsageError("distcnn export: --experiment names an MLflow experiment; it goes with --mlflow URI")
    if args.csv is not None or args.parquet is not None:
        rows, columns = export_rows(args.study_dir)
        if args.parquet is not None:
            require_pyarrow()
        for path, write in ((args.csv, write_csv), (args.parquet, write_parquet)):
            if path is not None:
                write(Path(path), rows, columns)
                print(f"exported {len(rows)} runs, {len(columns)} columns: {path}")
    if mlflow is not None:
        from distcnn.study.mlflow_export import describe_export, export_to_mlflow

        print(describe_export(export_to_mlflow(args.study_dir, mlflow, args.experiment), mlflow))
    return 0
