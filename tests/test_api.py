"""The Python API (`from distcnn import ...`) does what the command line does: a real tiny run trained and read
back, a study run on a stubbed trainer, and the shared real study analysed."""

from __future__ import annotations

import subprocess
import sys

import pytest

import distcnn
from distcnn import TrainConfig, analyze, load_run, run_study, train
from distcnn.errors import UsageError
from helpers import stub_training, write_study


def test_importing_distcnn_does_not_import_torch_or_pandas():
    code = "import distcnn, sys; print('torch' in sys.modules or 'pandas' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    assert distcnn.__version__


@pytest.mark.slow
def test_train_from_a_dict_and_load_the_run(tmp_path):
    out = tmp_path / "run"
    summary = train({"data": "synthetic:n=200", "epochs": 1, "batch-size": 32, "out": str(out)})
    assert 0 <= summary["test_accuracy"] <= 1
    run = load_run(out)
    assert run.finished and run.summary["test_accuracy"] == summary["test_accuracy"]
    assert run.config["epochs"] == 1 and run.config["data"] == "synthetic:n=200"
    assert len(run.epochs) == 1 and run.epochs[0]["epoch"] in (0, 1)


def test_train_refuses_an_unknown_option_with_the_nearest_flag(tmp_path):
    with pytest.raises(UsageError, match="--epochs"):
        train({"epoch": 1, "out": str(tmp_path / "run")})


def test_load_run_of_a_folder_without_a_record_is_one_clear_error(tmp_path):
    with pytest.raises(UsageError, match="not a run directory"):
        load_run(tmp_path)


def test_run_study_returns_every_run_done(tmp_path, monkeypatch):
    calls = stub_training(monkeypatch)
    runs = run_study(write_study(tmp_path), tmp_path / "out")
    assert len(runs) == 8 and all(run["status"] == "done" for run in runs)
    assert sum(calls.values()) == 8
    assert (tmp_path / "out" / "study.db").exists()


def test_run_study_and_analyze_on_a_stubbed_trainer(tmp_path, monkeypatch):
    stub_training(monkeypatch)
    run_study(write_study(tmp_path), tmp_path / "out")
    result = analyze(tmp_path / "out", responses=["test_accuracy"])
    assert list(result.results) == ["test_accuracy"] and result.runs == 8


@pytest.mark.slow
def test_analyze_the_shared_study_with_its_own_factors_and_responses(tiny_study):
    result = analyze(tiny_study)
    assert result.runs == 8
    assert "test_accuracy" in result.results
    shares = result.results["test_accuracy"]
    assert set(shares["factors"]) == {"policy", "model"}
    assert "variation_percent" in shares["responses"]["test_accuracy"]


def test_analyze_a_table_needs_factors_and_responses(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("a,y\n1,2\n2,3\n")
    with pytest.raises(UsageError, match="needs factors and responses"):
        analyze(table)


def test_train_takes_a_config(tmp_path, monkeypatch):
    from distcnn import launch

    seen = []
    monkeypatch.setattr(launch, "run", lambda config: seen.append(config) or {"test_accuracy": 0.5})
    config = TrainConfig(data="synthetic:n=200", epochs=1, out=str(tmp_path / "run"))
    assert train(config) == {"test_accuracy": 0.5} and seen == [config]
