"""What every section of the report reads: the study as it was left (its table of done runs, its factors and
their levels, each run's configuration label) and how a figure reads (by its unit, from distcnn.summary).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import pandas as pd

from distcnn import summary as declared
from distcnn.errors import UsageError
from distcnn.study.store import load_runs_table, open_study, option_name, run_directory
from distcnn.units import Scale, decimals_for, human_bytes, scale, with_unit

ALPHA = 0.05
ACCURACY = declared.key("test_accuracy")
CONSTANT_CV = 0.01  # a response whose runs vary by less (std / |mean|) is practically constant


# ---- formatting --------------------------------------------------------------------------------------------

def number(value, unit: str = "") -> str:
    """A figure as its unit reads best: fractions (accuracies) to 4 decimals, percentages to 1, bytes in
    KiB/MiB/GiB; `unit` as distcnn.summary declares it (declared.unit(name) for a figure's name)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if unit == "fraction":
        return f"{value:.4f}"
    if unit == "%":
        return f"{value:.1f}"
    if unit in ("B", "B/s"):
        return human_bytes(value)
    return f"{value:,.{min(decimals_for(value), 8)}f}"


def values(table: pd.DataFrame, response: str) -> pd.Series:
    """A response's numbers over the done runs (NaN where a run has none)."""
    return pd.to_numeric(table[response], errors="coerce") if response in table else pd.Series(dtype=float)


def response_scale(table: pd.DataFrame, response: str) -> Scale:
    """The one unit (declared in distcnn.summary) and precision a response reads in throughout the report."""
    return scale(values(table, response).dropna(), declared.unit(response))


def response_label(table: pd.DataFrame, response: str) -> str:
    """`train_seconds (s)`, `rss_peak_bytes (MiB)`: the name and the unit its figures are shown in."""
    return with_unit(response, response_scale(table, response).label)


def variation_coefficient(table: pd.DataFrame, response: str) -> float | None:
    """std / |mean| of a response over the runs (None: fewer than 2 numbers or a mean of 0)."""
    y = values(table, response).dropna()
    if len(y) < 2 or y.mean() == 0:
        return None
    return float(y.std(ddof=1) / abs(y.mean()))


def practically_constant(table: pd.DataFrame, response: str) -> bool:
    cv = variation_coefficient(table, response)
    return cv is not None and cv < CONSTANT_CV


def constant_marker(table: pd.DataFrame, response: str) -> str:
    """The grey note after a response that barely varies: its shares and effects are noise-sized."""
    cv = variation_coefficient(table, response)
    return f" (practically constant: CV {100 * cv:.2g} %)" if cv is not None and cv < CONSTANT_CV else ""


def configuration_label(levels: dict, factors: list[str]) -> str:
    """How a configuration is named throughout the report: `policy=none, model=lenet`."""
    return ", ".join(f"{name}={levels[name]}" for name in factors)


def plain(value) -> str:
    if isinstance(value, (dict, list)):
        return ", ".join(f"{k} {plain(v)}" for k, v in value.items()) if isinstance(value, dict) else \
            ", ".join(map(plain, value))
    return "none" if value is None else str(value)


# ---- what the study left -----------------------------------------------------------------------------------

@dataclass
class Study:
    directory: Path
    spec: dict
    runs: list[dict]  # every planned run, done or not
    table: pd.DataFrame  # one row per done run
    factors: list[str]
    level_order: dict[str, list]
    labels: pd.Series  # each done run's configuration label
    configurations: list[str]  # the labels present, in the study file's order

    def run_dir(self, row) -> Path:
        """The run record where the study wrote it; under the study directory when the study was moved."""
        return run_directory(self.directory, row["run_id"], row["run_dir"])


def load_study(study_dir: str | Path) -> Study:
    directory = Path(study_dir)
    rows, level_order = load_runs_table(directory)  # UsageError when there is no study.db
    store = open_study(directory)
    try:
        spec, runs = store.spec(), store.runs()
    finally:
        store.close()
    if not rows:
        raise UsageError(f"no finished run in {directory} yet")
    factors = [option_name(name) for name in spec["factors"]]
    table = pd.DataFrame(rows)
    labels = table.apply(lambda row: configuration_label(row, factors), axis=1)
    every = [configuration_label(dict(zip(factors, levels)), factors)
             for levels in product(*(level_order[name] for name in factors))]
    return Study(directory, spec, runs, table, factors, level_order, labels,
                 [label for label in every if label in set(labels)])


def numeric(table: pd.DataFrame, column: str) -> bool:
    return column in table and pd.to_numeric(table[column], errors="coerce").notna().any()


@dataclass(frozen=True)
class Section:
    """An optional part of the report: written when `applies` to the study (its factors or figures)."""

    name: str
    applies: Callable[[Study], bool]
    blocks: Callable[[Study], list]
