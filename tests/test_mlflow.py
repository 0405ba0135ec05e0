"""`distcnn export DIR --mlflow URI`: a run or a study in a local MLflow store (offline), read back with
MlflowClient; exporting again doubles nothing. MLflow is the optional extra `distcnn[mlflow]` (make test installs
it); the tests that need it are skipped, with the reason, where it is missing."""

from __future__ import annotations

import csv
import json
import shutil
import sys

import pytest

from distcnn import run_study
from helpers import cli, stub_training, usage_error, write_study

OPTIONS = {"data": "synthetic:n=200", "epochs": 2, "batch_size": 32, "threads": 1, "sample_interval": 0.1}
MISSING = "MLflow is not installed: pip install 'distcnn[mlflow]' (make test installs it)"


def need_mlflow():
    pytest.importorskip("mlflow", reason=MISSING)


def mlflow_client(uri):
    need_mlflow()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real 2-epoch run on synthetic data (a few seconds). Read it, never change it: copy it first."""
    from distcnn.config import make_config
    from distcnn.launch import run

    run_dir = tmp_path_factory.mktemp("mlflow-run") / "run"
    run(make_config(OPTIONS | {"out": str(run_dir)}))
    return run_dir


def active_runs(client, experiment):
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_a_run_in_a_sqlite_store_has_its_params_epoch_metrics_and_artifacts(tiny_run, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    client = mlflow_client(uri)
    code, out, err = cli(capsys, "export", tiny_run, "--mlflow", uri)
    assert code == 0, err
    assert out.strip() == f"mlflow: 1 run logged — experiment 'distcnn' in {uri}"
    [run] = active_runs(client, "distcnn")
    config = json.loads((tiny_run / "config.json").read_text())
    summary = json.loads((tiny_run / "summary.json").read_text())
    with open(tiny_run / "epochs.csv", newline="") as handle:
        epochs = list(csv.DictReader(handle))
    assert run.data.params["epochs"] == "2" and run.data.params["model"] == config["model"]
    assert run.data.params["lr"] == str(config["lr"]) and run.data.params["seed"] == "0"
    history = client.get_metric_history(run.info.run_id, "epoch/val_accuracy")
    assert len(history) == len(epochs) == 2 and [point.step for point in history] == [1, 2]
    assert [point.value for point in history] == pytest.approx([float(row["val_accuracy"]) for row in epochs])
    assert len(client.get_metric_history(run.info.run_id, "epoch/train_loss")) == 2
    assert run.data.metrics["summary/test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert "summary/diverged" not in run.data.metrics  # a yes/no is no metric
    names = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "summary.json", "epochs.csv", "environment.json"} <= names
    assert (tmp_path / "store" / "mlartifacts").is_dir()  # beside the database, not in the working directory
    assert run.info.status == "FINISHED" and run.info.run_name == summary["name"]

    code, out, _ = cli(capsys, "export", tiny_run, "--mlflow", uri)
    assert code == 0 and "0 runs logged, 1 unchanged" in out
    assert len(active_runs(client, "distcnn")) == 1


def test_a_run_trained_again_replaces_its_mlflow_run(tiny_run, tmp_path, capsys):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow_client(uri)
    assert cli(capsys, "export", run_dir, "--mlflow", uri, "--experiment", "mine")[0] == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps(summary | {"test_accuracy": 0.123}))
    code, out, _ = cli(capsys, "export", run_dir, "--mlflow", uri, "--experiment", "mine")
    assert code == 0 and "0 runs logged, 1 replaced" in out
    [run] = active_runs(client, "mine")
    assert run.data.metrics["summary/test_accuracy"] == pytest.approx(0.123)


def test_a_study_is_a_parent_run_with_one_nested_run_per_finished_run(tmp_path, monkeypatch, capsys):
    stub_training(monkeypatch, fail=lambda config, attempt: RuntimeError("boom") if config.model == "lenet" else None)
    run_study(write_study(tmp_path), tmp_path / "out", retries=0)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow_client(uri)
    code, out, _ = cli(capsys, "export", tmp_path / "out", "--mlflow", uri)
    assert code == 0 and "4 runs logged, 4 not finished (left out) — experiment 'tiny'" in out
    runs = active_runs(client, "tiny")
    [parent] = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if run is not parent]
    assert parent.info.run_name == "tiny"
    assert json.loads(parent.data.params["factors"])["model"] == ["lenet", "simplecnn"]
    assert len(children) == 4 and all(run.data.tags["mlflow.parentRunId"] == parent.info.run_id for run in children)
    assert {run.data.params["factor.policy"] for run in children} == {"none", "flip-crop"}
    assert {run.data.params["factor.model"] for run in children} == {"simplecnn"}
    assert len({run.data.params["seed"] for run in children}) == 2  # the replicates' seeds
    assert all(run.data.tags["distcnn.study"] == "tiny" and "summary/test_accuracy" in run.data.metrics
               for run in children)
    assert {run.data.tags["distcnn.run_id"] for run in children} == {run.info.run_name for run in children}

    assert all({a.path for a in client.list_artifacts(run.info.run_id)} == {"summary.json"} for run in children)

    code, out, _ = cli(capsys, "export", tmp_path / "out", "--mlflow", uri)
    assert code == 0 and "0 runs logged, 4 unchanged" in out
    assert len(active_runs(client, "tiny")) == 5

    stub_training(monkeypatch)  # the failed runs run again and finish: the next export adds only them
    run_study(write_study(tmp_path), tmp_path / "out", retries=1)
    code, out, _ = cli(capsys, "export", tmp_path / "out", "--mlflow", uri)
    assert code == 0 and "4 runs logged, 4 unchanged — " in out and "not finished" not in out
    runs = active_runs(client, "tiny")
    assert len(runs) == 9 and len({run.data.tags["distcnn.key"] for run in runs}) == 9


def test_a_file_store_works_where_mlflow_allows_it(tiny_run, tmp_path, monkeypatch, capsys):
    uri = (tmp_path / "mlruns").as_uri()
    need_mlflow()
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert "MLFLOW_ALLOW_FILE_STORE=true" in usage_error(capsys, "export", tiny_run, "--mlflow", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert cli(capsys, "export", tiny_run, "--mlflow", uri)[0] == 0
    [run] = active_runs(mlflow_client(uri), "distcnn")
    assert len(mlflow_client(uri).get_metric_history(run.info.run_id, "epoch/val_accuracy")) == 2


def test_without_mlflow_the_export_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "summary.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    line = usage_error(capsys, "export", tmp_path, "--mlflow", f"sqlite:///{tmp_path}/mlflow.db")
    assert "pip install 'distcnn[mlflow]'" in line
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such directory"),
    ("not a run", "neither a run directory"),
    ("unfinished", "has not finished"),
])
def test_a_folder_that_is_no_finished_run_or_study_is_one_line(case, expected, tmp_path, capsys):
    folder = tmp_path / "run"
    if case != "missing":
        folder.mkdir()
    if case == "unfinished":
        (folder / "config.json").write_text("{}")
    assert expected in usage_error(capsys, "export", folder, "--mlflow", f"sqlite:///{tmp_path}/mlflow.db")


@pytest.mark.parametrize("uri, expected", [
    ("sqlite://", "give a database file"),
    ("", "give a tracking URI"),
    ("sqlite:///{tmp}/summary.json/mlflow.db", "cannot create"),
    ("nosuchscheme://host/x", "--mlflow nosuchscheme://host/x:"),
])
def test_a_bad_uri_is_one_line(uri, expected, tmp_path, capsys):
    need_mlflow()
    (tmp_path / "summary.json").write_text("{}")
    assert expected in usage_error(capsys, "export", tmp_path, "--mlflow", uri.format(tmp=tmp_path))


def test_an_experiment_without_mlflow_is_one_line(tmp_path, capsys):
    assert "goes with --mlflow" in usage_error(capsys, "export", tmp_path, "--csv", tmp_path / "x.csv",
                                               "--experiment", "x")
