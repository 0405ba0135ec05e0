"""What a researcher meets first at the command line: typos refused rather than guessed, `--version`, `analyze`
of a study without restating its design, and `models --filter` that shows rows as it measures them."""

from __future__ import annotations

import json

import pytest

from helpers import cli, usage_error

# Three small timm nets: a pattern that lists quickly, even with --flops.
SMALL_PATTERN, SMALL_MATCHES = "mobilenetv3_small*", ("mobilenetv3_small_050", "mobilenetv3_small_075",
                                                       "mobilenetv3_small_100")


# ---- abbreviations and --version ----------------------------------------------------------------------------

@pytest.mark.parametrize("args, nearest", [(("train", "--epoch", "1"), "--epochs"),
                                           (("models", "--filt", "lenet"), "--filter"),
                                           (("analyze", "x.csv", "--factor", "a"), "--factors")])
def test_an_abbreviated_flag_is_refused_with_the_nearest(args, nearest, capsys):
    """argparse would run `--epoch 1` as `--epochs 1`; a typo must be named, not guessed."""
    line = usage_error(capsys, *args)
    assert "unrecognized arguments" in line and f"nearest: {nearest}" in line
    assert not line.startswith("distcnn: error: distcnn:"), line


def test_version_prints_the_package_version(capsys):
    from distcnn.cli import version

    code, out, err = cli(capsys, "--version")
    assert code == 0 and err == ""
    assert out.strip() == f"distcnn {version()}" and version() != "unknown"


# ---- analyze a study with its own factors and responses -----------------------------------------------------

def test_analyze_a_study_defaults_to_its_factors_and_responses(tiny_study, capsys):
    code, out, err = cli(capsys, "analyze", tiny_study)
    assert code == 0, err
    assert "test_accuracy: allocation of variation (2^k r, replicates: 2)" in out
    for response in ("test_accuracy", "cpu_percent_mean", "train_seconds"):  # helpers.TINY_STUDY's responses
        assert f"{response}: allocation of variation" in out or f"no analysis of {response}:" in out
    for term in ("policy", "model", "policy:model"):
        assert term in out

    code, out, err = cli(capsys, "analyze", tiny_study, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["factors"] == ["policy", "model"] and result["design"] == "2k"
    assert "test_accuracy" in result["responses"]
    assert set(result["responses"]) | set(result.get("skipped", {})) == {"test_accuracy", "cpu_percent_mean",
                                                                          "train_seconds"}


def test_analyze_a_study_with_one_flag_given_defaults_the_other(tiny_study, capsys):
    code, out, err = cli(capsys, "analyze", tiny_study, "--responses", "test_accuracy", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["factors"] == ["policy", "model"] and list(result["responses"]) == ["test_accuracy"]
    assert "policy" in usage_error(capsys, "analyze", tiny_study, "--factors", "polcy")


def test_analyze_a_table_needs_factors_and_responses(tmp_path, capsys):
    table = tmp_path / "runs.csv"
    table.write_text("a,y\n1,0.5\n2,0.7\n1,0.6\n2,0.8\n")
    assert "needs --factors and --responses" in usage_error(capsys, "analyze", table)
    assert "needs --factors" in usage_error(capsys, "analyze", table, "--responses", "y")
    assert "needs --responses" in usage_error(capsys, "analyze", table, "--factors", "a")


# ---- models: one row at a time ------------------------------------------------------------------------------

def test_models_filter_lists_params_fast_and_flops_on_request(capsys):
    code, out, err = cli(capsys, "models", "--filter", SMALL_PATTERN)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.startswith(SMALL_MATCHES)]
    assert [row[0] for row in rows] == list(SMALL_MATCHES)
    assert all(row[1] == "timm" and int(row[2].replace(",", "")) > 0 and len(row) == 3 for row in rows)
    assert "--flops" in out and "GFLOPs" not in out

    code, out, err = cli(capsys, "models", "--filter", "mobilenetv3_small_050", "--flops")
    assert code == 0, err
    (row,) = [line.split() for line in out.splitlines() if line.startswith("mobilenetv3_small_050")]
    assert "GFLOPs" in out and float(row[3]) > 0


def test_models_default_list_counts_flops(monkeypatch, capsys):
    monkeypatch.setattr("distcnn.models.LISTED_TIMM_MODELS", ("mobilenetv3_small_050",))  # keep the test short
    code, out, err = cli(capsys, "models")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == {"simplecnn", "deepcnn", "lenet", "mobilenetv3_small_050"}
    assert all(float(row[3]) > 0 for row in rows.values())


def test_rows_are_measured_one_at_a_time():
    """The first row exists before the next model is even looked up: what lets `models` stream."""
    from distcnn.errors import UsageError
    from distcnn.models import describe_each

    rows = describe_each(["lenet", "lenett"], in_chans=1, image_size=28, num_classes=10, flops=False)
    first = next(rows)
    assert first["name"] == "lenet" and first["params"] == 61_706 and first["train_flops_per_image"] is None
    with pytest.raises(UsageError, match="nearest: lenet"):
        next(rows)


def test_models_filter_matching_nothing_is_one_line(capsys):
    assert "nearest" in usage_error(capsys, "models", "--filter", "resnet18x")


def test_a_study_response_without_numbers_is_skipped_not_fatal():
    """A GPU figure on a CPU has no numbers: the study's other responses are still analysed."""
    import pandas as pd

    from distcnn.study.analysis_command import _study_analysis

    table = pd.DataFrame({"a": [1, 1, 2, 2] * 2, "b": [1, 2, 1, 2] * 2, "y": [1.0, 2.0, 3.0, 4.5] * 2})
    table["y"] += [0, 0.1, 0, 0.2, 0.1, 0, 0.3, 0]
    result, skipped = _study_analysis(table, ["a", "b"], ["gpu_util", "y"], {}, 0.05)
    assert list(result["responses"]) == ["y"] and result["design"] == "2k" and result["replicates"] == 2
    assert "0 runs have a number" in skipped["gpu_util"]
