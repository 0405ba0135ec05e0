"""The analysis of a factorial study: known effects come back, shares agree with statsmodels, bad input is one line."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import sys
import types

import numpy as np
import pandas as pd
import pytest

from distcnn.errors import UsageError
from distcnn.study.analysis import analyze
from distcnn.study.analysis_command import load_source

HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None
TRUE_EFFECTS = {"mean": 10.0, "A": 3.0, "B": -2.0, "C": 0.5, "A:B": 1.5, "A:C": 0.0, "B:C": 0.0, "A:B:C": 0.0}


def two_level_table(replicates: int = 3, seed: int = 1) -> pd.DataFrame:
    """y = 10 + 3 xA - 2 xB + 1.5 xA xB + 0.5 xC + N(0, 0.3²); A's levels are words, B's and C's numbers."""
    rng = np.random.default_rng(seed)
    rows = []
    for xa, xb, xc in itertools.product((-1, 1), repeat=3):
        for _ in range(replicates):
            y = 10 + 3 * xa - 2 * xb + 1.5 * xa * xb + 0.5 * xc + rng.normal(0, 0.3)
            rows.append({"A": "low" if xa < 0 else "high", "B": xb, "C": xc, "y": y})
    return pd.DataFrame(rows)


def test_two_level_design_recovers_known_effects():
    # every one of the 8 intervals covers its true value with this seed (≈ 0.95^8 of seeds do; see below)
    table = two_level_table()
    result = analyze(table, ["A", "B", "C"], ["y"])
    assert (result["design"], result["replicates"]) == ("2k", 3)
    entry = result["responses"]["y"]
    shares = entry["variation_percent"]
    assert list(shares) == ["A", "B", "C", "A:B", "A:C", "B:C", "A:B:C", "error"]
    assert sum(shares.values()) == pytest.approx(100, abs=1e-9)
    assert max(shares, key=shares.get) == "A"
    for term, truth in TRUE_EFFECTS.items():
        low, high = entry["ci"][term]
        assert low <= truth <= high, (term, low, truth, high)
    high_mean = table.loc[table["A"] == "high", "y"].mean()
    low_mean = table.loc[table["A"] == "low", "y"].mean()
    assert entry["effects"]["A"] == pytest.approx((high_mean - low_mean) / 2, abs=1e-12)
    assert entry["effects"]["mean"] == pytest.approx(table["y"].mean(), abs=1e-12)
    assert len(entry["means"]) == 8 and all(mean["n"] == 3 for mean in entry["means"])
    assert entry["means"][0]["levels"] == {"A": "low", "B": -1, "C": -1}
    assert json.loads(json.dumps(result)) == result


def test_effect_intervals_cover_the_true_effects_95_percent_of_the_time():
    covered = [low <= TRUE_EFFECTS[term] <= high
               for seed in range(300)
               for term, (low, high) in analyze(two_level_table(seed=seed), ["A", "B", "C"], ["y"])
               ["responses"]["y"]["ci"].items()]
    assert 0.93 < np.mean(covered) < 0.97  # 0.942 with these seeds (0.952 over 3,000 other seeds)


def test_swapping_the_level_order_flips_the_sign_and_keeps_the_shares():
    table = two_level_table()
    plain = analyze(table, ["A", "B", "C"], ["y"])["responses"]["y"]
    swapped = analyze(table, ["A", "B", "C"], ["y"], level_order={"A": ["high", "low"]})["responses"]["y"]
    for term, effect in plain["effects"].items():
        sign = -1 if "A" in term.split(":") else 1
        assert swapped["effects"][term] == pytest.approx(sign * effect, abs=1e-12)
    assert swapped["variation_percent"] == pytest.approx(plain["variation_percent"], abs=1e-9)


def test_first_appearance_sets_the_order_when_none_is_given():
    table = two_level_table()
    reordered = analyze(table.iloc[::-1], ["A", "B", "C"], ["y"])["responses"]["y"]
    plain = analyze(table, ["A", "B", "C"], ["y"])["responses"]["y"]
    assert reordered["means"][0]["levels"] == {"A": "high", "B": 1, "C": 1}
    assert reordered["effects"]["A"] == pytest.approx(-plain["effects"]["A"])


def test_three_by_two_levels_agree_with_statsmodels_anova():
    from statsmodels.formula.api import ols
    from statsmodels.stats.anova import anova_lm

    rng = np.random.default_rng(3)
    rows = [{"batch size": size, "aug-policy": policy, "y": 0.01 * size + (policy == "on") + rng.normal(0, 0.5)}
            for size in (32, 64, 128) for policy in ("off", "on") for _ in range(4)]
    table = pd.DataFrame(rows)
    result = analyze(table, ["batch size", "aug-policy"], ["y"])
    assert (result["design"], result["replicates"]) == ("anova", 4)
    shares = result["responses"]["y"]["variation_percent"]

    model = ols('y ~ C(Q("batch size"), Sum) * C(Q("aug-policy"), Sum)', table).fit()
    sums = anova_lm(model, typ=2)["sum_sq"].to_numpy()
    total = ((table["y"] - table["y"].mean()) ** 2).sum()
    expected = dict(zip(["batch size", "aug-policy", "batch size:aug-policy", "error"], 100 * sums / total))
    assert shares == pytest.approx(expected, abs=1e-9)
    assert sum(shares.values()) == pytest.approx(100, abs=1e-9)

    effects, ci = result["responses"]["y"]["effects"], result["responses"]["y"]["ci"]
    assert set(effects["batch size"]) == {"32", "64", "128"}
    assert sum(effects["batch size"].values()) == pytest.approx(0, abs=1e-9)
    for level, effect in effects["batch size"].items():
        low, high = ci["batch size"][level]
        assert low < effects["mean"] + effect < high


def test_f_and_p_per_term_agree_with_statsmodels_for_both_designs():
    from statsmodels.formula.api import ols
    from statsmodels.stats.anova import anova_lm

    rng = np.random.default_rng(5)
    two = pd.DataFrame([{"A": a, "B": b, "y": 2 * (a == "on") + 0.3 * (b == "y") + rng.normal(0, 0.4)}
                        for a in ("off", "on") for b in ("x", "y") for _ in range(3)])
    entry = analyze(two, ["A", "B"], ["y"])["responses"]["y"]
    expected = anova_lm(ols("y ~ C(A, Sum) * C(B, Sum)", two).fit(), typ=2)
    assert entry["f"]["A"] == pytest.approx(expected.loc["C(A, Sum)", "F"])
    assert entry["p"]["A:B"] == pytest.approx(expected.loc["C(A, Sum):C(B, Sum)", "PR(>F)"])
    assert entry["df_residual"] == 8 and entry["p"]["A"] < 0.001


def test_without_replicates_f_and_p_are_unavailable_not_zero():
    table = pd.DataFrame({"A": [1, 2, 3] * 2, "B": ["x"] * 3 + ["y"] * 3, "y": [1.0, 2.5, 2.0, 3.0, 4.0, 6.5]})
    entry = analyze(table, ["A", "B"], ["y"])["responses"]["y"]
    assert entry["df_residual"] == 0
    assert set(entry["f"]) == {"A", "B", "A:B"} and all(v is None for v in [*entry["f"].values(), *entry["p"].values()])


def test_a_level_effect_is_printed_with_the_interval_of_that_deviation(capsys):
    from distcnn.study.analysis_command import print_result

    rng = np.random.default_rng(7)
    table = pd.DataFrame([{"size": size, "y": {32: 1.0, 64: 2.0, 128: 4.0}[size] + rng.normal(0, 0.1)}
                          for size in (32, 64, 128) for _ in range(4)])
    result = analyze(table, ["size"], ["y"])
    entry = result["responses"]["y"]
    for level, effect in entry["effects"]["size"].items():
        low, high = entry["effect_ci"]["size"][level]
        assert low < effect < high  # the deviation lies in its own interval (the level mean's is elsewhere)
    print_result(result, 0.05)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "size = 32" in line)
    effect, low, high = (float(x) for x in re.findall(r"-?\d+\.\d+", line)[-3:])
    assert effect < 0 and low < effect < high


def test_unreplicated_two_by_two_has_no_error_term():
    table = pd.DataFrame({"A": ["off", "on", "off", "on"], "B": ["cnn", "cnn", "resnet", "resnet"],
                          "y": [1.0, 4.0, 2.0, 7.0]})
    result = analyze(table, ["A", "B"], ["y"])
    entry = result["responses"]["y"]
    assert (result["design"], result["replicates"]) == ("2k", 1)
    assert entry["variation_percent"]["error"] is None and entry["ci"] is None
    assert sum(share for share in entry["variation_percent"].values() if share is not None) == pytest.approx(100)
    assert entry["effects"]["A:B"] == pytest.approx((1 - 4 - 2 + 7) / 4)
    assert all(mean["ci"] is None for mean in entry["means"])


def test_unreplicated_three_levels_keep_their_shares_without_error():
    table = pd.DataFrame({"A": [1, 2, 3] * 2, "B": ["x"] * 3 + ["y"] * 3, "y": [1.0, 2.5, 2.0, 3.0, 4.0, 6.5]})
    entry = analyze(table, ["A", "B"], ["y"])["responses"]["y"]
    assert entry["variation_percent"]["error"] is None and entry["ci"] is None
    assert sum(share for share in entry["variation_percent"].values() if share is not None) == pytest.approx(100)


def test_unbalanced_two_level_design_falls_back_to_anova_with_a_note():
    table = two_level_table().drop(index=[0])
    result = analyze(table, ["A", "B", "C"], ["y"])
    assert result["design"] == "anova" and result["replicates"] is None and "unbalanced" in result["note"]
    shares = analyze(two_level_table().drop(index=[0, 1, 2]), ["A", "B", "C"], ["y"])
    assert "without runs" in shares["note"] and shares["responses"]["y"]["variation_percent"]["A:B"] is None


def test_runs_without_a_response_value_are_left_out_of_that_response_only():
    table = two_level_table()
    table["z"] = table["y"]
    table.loc[0, "z"] = np.nan
    result = analyze(table, ["A", "B", "C"], ["y", "z"])
    assert result["design"] == "2k" and "design" not in result["responses"]["y"]
    assert result["responses"]["z"]["design"] == "anova"
    assert sum(mean["n"] for mean in result["responses"]["z"]["means"]) == len(table) - 1


BAD_REQUESTS = {
    "unknown factor": (["Aa", "B"], ["y"], "nearest: A"),
    "unknown response": (["A", "B"], ["yy"], "nearest: y"),
    "text response": (["A", "B"], ["label"], "not numeric"),
    "single level": (["A", "D"], ["y"], "single level"),
    "no factors": ([], ["y"], "at least one factor"),
    "named twice": (["A", "A"], ["y"], "named twice"),
    "empty response": (["A", "B"], ["empty"], "only 0 runs"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_requests_are_one_line(case):
    factors, responses, expected = BAD_REQUESTS[case]
    table = pd.DataFrame({"A": [1, 2, 1, 2], "B": [1, 1, 2, 2], "D": [5] * 4, "y": [1.0, 2, 3, 4],
                          "label": ["a", "b", "c", "d"], "empty": [np.nan] * 4})
    with pytest.raises(UsageError) as error:
        analyze(table, factors, responses)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_one_run_is_not_enough():
    with pytest.raises(UsageError, match="at least 2 runs"):
        analyze(pd.DataFrame({"A": [1], "y": [1.0]}), ["A"], ["y"])


def test_load_source_reads_a_csv_and_rejects_what_it_cannot_read(tmp_path):
    path = tmp_path / "runs.csv"
    two_level_table().to_csv(path, index=False)
    table, order = load_source(path)
    assert len(table) == 24 and order == {}
    cases = {tmp_path / "missing.csv": "does not exist", tmp_path: "no study.db",
             tmp_path / "runs.txt": "allowed are a study directory or a .csv, .parquet, .pq file"}
    (tmp_path / "runs.txt").write_text("A,y\n")
    for source, expected in cases.items():
        with pytest.raises(UsageError, match=expected):
            load_source(source)


def test_a_study_directory_gives_its_level_order(tmp_path, monkeypatch):
    (tmp_path / "study.db").touch()
    rows = [{"augment": augment, "model": model, "replicate": 0, "seed": 1, "accuracy": 0.5 + 0.1 * augment}
            for augment in (True, False) for model in ("cnn", "resnet18")]
    store = types.ModuleType("distcnn.study.store")
    store.load_runs_table = lambda study_dir: (rows, {"augment": [False, True], "model": ["cnn", "resnet18"]})
    monkeypatch.setitem(sys.modules, "distcnn.study.store", store)
    table, order = load_source(tmp_path)
    entry = analyze(table, ["augment", "model"], ["accuracy"], order)["responses"]["accuracy"]
    assert entry["means"][0]["levels"] == {"augment": False, "model": "cnn"}
    assert entry["effects"]["augment"] == pytest.approx(0.05)


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow not installed")
def test_parquet_reads_like_csv(tmp_path):
    path = tmp_path / "runs.parquet"
    two_level_table().to_parquet(path)
    table, _ = load_source(path)
    assert analyze(table, ["A", "B", "C"], ["y"]) == analyze(two_level_table(), ["A", "B", "C"], ["y"])


@pytest.mark.skipif(HAS_PYARROW, reason="pyarrow is installed")
def test_parquet_without_pyarrow_says_what_to_install(tmp_path):
    path = tmp_path / "runs.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(UsageError) as error:
        load_source(path)
    assert str(error.value) == "reading Parquet needs pyarrow (pip install pyarrow); or give a CSV"


def test_cli_prints_json_only(tmp_path):
    from helpers import run_cli

    path = tmp_path / "runs.csv"
    two_level_table().to_csv(path, index=False)
    result = run_cli("analyze", str(path), "--factors", "A,B", "--responses", "y", "--json")
    assert result.returncode == 0, result.stderr
    shares = json.loads(result.stdout)["responses"]["y"]["variation_percent"]
    assert set(shares) == {"A", "B", "A:B", "error"}

    table = run_cli("analyze", str(path), "--factors", "A,B,C", "--responses", "y")
    assert table.returncode == 0 and "allocation of variation" in table.stdout and "A:B:C" in table.stdout


def test_cli_unknown_response_is_one_line_and_exit_2(tmp_path, capsys):
    from helpers import usage_error

    path = tmp_path / "runs.csv"
    two_level_table().to_csv(path, index=False)
    assert "nearest: y" in usage_error(capsys, "analyze", path, "--factors", "A,B", "--responses", "yy")


def test_the_tables_name_every_term_and_configuration(tmp_path, capsys):
    from distcnn.cli import build_parser
    from distcnn.study.analysis_command import command_analyze

    parser = build_parser()
    path = tmp_path / "runs.csv"
    table = two_level_table()
    table.to_csv(path, index=False)
    assert command_analyze(parser.parse_args(["analyze", str(path), "--factors", "A,B,C", "--responses", "y"])) == 0
    printed = capsys.readouterr().out
    assert "2^k r, replicates: 3" in printed and "A:B:C" in printed and "high" in printed

    table["D"] = np.tile([1, 2, 3], 8)
    table.to_csv(path, index=False)
    command_analyze(parser.parse_args(["analyze", str(path), "--factors", "A,D", "--responses", "y", "--json"]))
    result = json.loads(capsys.readouterr().out)
    assert result["design"] == "anova" and set(result["responses"]["y"]["effects"]["D"]) == {"1", "2", "3"}
