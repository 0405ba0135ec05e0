"""`distcnn export`: every run of a study, one row each, in a table other tools read; mistakes are one line."""

from __future__ import annotations

import csv
import sqlite3

import pytest

from distcnn import run_study
from distcnn.study.export import export_rows
from helpers import cli, copy_study, stub_training, usage_error, write_study


def read_csv(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


@pytest.mark.slow
def test_export_of_the_shared_study_has_one_row_per_run(tiny_study, tmp_path, capsys):
    study = copy_study(tiny_study, tmp_path)
    code, out, _ = cli(capsys, "export", study, "--csv", tmp_path / "runs.csv")
    assert code == 0 and "exported 8 runs" in out
    columns, rows = read_csv(tmp_path / "runs.csv")
    assert columns[:3] == ["run_id", "policy", "model"]
    assert columns.index("test_accuracy") < columns.index("cpu_percent_mean") < columns.index("train_seconds")
    assert len(rows) == 8 and len({row["run_id"] for row in rows}) == 8
    assert all(row["status"] == "done" and 0 <= float(row["test_accuracy"]) <= 1 for row in rows)
    assert {row["policy"] for row in rows} == {"none", "flip-crop"}


def test_export_keeps_failed_runs_with_their_error(tmp_path, monkeypatch):
    stub_training(monkeypatch, fail=lambda config, attempt: RuntimeError("boom") if config.model == "lenet" else None)
    run_study(write_study(tmp_path), tmp_path / "out", retries=0)
    rows, columns = export_rows(tmp_path / "out")
    assert len(rows) == 8 and columns[:3] == ["run_id", "policy", "model"]
    failed = [row for row in rows if row["status"] == "failed"]
    assert len(failed) == 4 and all("boom" in row["error"] and "test_accuracy" not in row for row in failed)
    assert len(columns) == len(set(columns)) and columns[-2:] == sorted(columns[-2:])
    assert all(row["seed"] == run["seed"] for row, run in zip(rows, study_runs(tmp_path / "out")))


def study_runs(study_dir):
    with sqlite3.connect(study_dir / "study.db") as db:
        return [{"seed": seed} for (seed,) in db.execute("SELECT seed FROM runs ORDER BY run_order")]


def test_export_of_a_folder_that_is_not_a_study_is_one_line(tmp_path, capsys):
    line = usage_error(capsys, "export", tmp_path, "--csv", tmp_path / "runs.csv")
    assert "not a study directory" in line
    assert not (tmp_path / "runs.csv").exists()


def test_export_needs_an_output_file(tmp_path, capsys):
    assert "--csv FILE or --parquet FILE" in usage_error(capsys, "export", tmp_path)


@pytest.mark.slow
def test_export_to_parquet_has_one_row_per_run_with_the_factors(tiny_study, tmp_path, capsys):
    pandas = pytest.importorskip("pandas")
    study = copy_study(tiny_study, tmp_path)
    code, out, _ = cli(capsys, "export", study, "--parquet", tmp_path / "runs.parquet")
    assert code == 0 and "exported 8 runs" in out
    table = pandas.read_parquet(tmp_path / "runs.parquet")
    _, rows = read_csv_export(capsys, study, tmp_path / "runs.csv")
    assert len(table) == 8 and table["run_id"].is_unique
    assert list(table.columns[:3]) == ["run_id", "policy", "model"]
    assert set(table["policy"]) == {"none", "flip-crop"} and set(table["model"]) == {"lenet", "simplecnn"}
    assert (table["status"] == "done").all()
    by_run = {row["run_id"]: float(row["test_accuracy"]) for row in rows}
    assert all(by_run[str(run)] == pytest.approx(accuracy)
               for run, accuracy in zip(table["run_id"], table["test_accuracy"]))


def read_csv_export(capsys, study, path):
    assert cli(capsys, "export", study, "--csv", path)[0] == 0
    return read_csv(path)
