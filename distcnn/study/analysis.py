"""`distcnn analyze SOURCE`: how much of each response's variation each factor and each interaction explains.

Every factor at two levels, every configuration run equally often: the 2^k r allocation of variation from the
sign table, straight from the formulas of Jain (The Art of Computer Systems Performance Analysis, ch. 17-18),
with confidence intervals of the effects.
A factor with more levels, or a two-level design that is unbalanced or incomplete: a sum-to-zero ANOVA from
statsmodels, reported as the same shares of the total sum of squares. SOURCE is a study directory or a CSV or
Parquet table with one row per run, so measurements made elsewhere can be analysed the same way (it is read,
and the result printed, by distcnn.study.analysis_command).
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from distcnn.errors import UsageError, unknown

# ---- checking and coding the table -----------------------------------------------------------------------

def check_request(table: pd.DataFrame, factors: list[str], responses: list[str], alpha: float) -> None:
    """Every mistake in the request stops here, before any arithmetic, with one line."""
    if not factors or not responses:
        raise UsageError(f"give at least one {'factor' if not factors else 'response'} column")
    if not 0 < alpha < 1:
        raise UsageError(f"--alpha must lie between 0 and 1 (e.g. 0.05), got {alpha}")
    columns = [str(column) for column in table.columns]
    for kind, names in (("factor", factors), ("response", responses)):
        for name in names:
            if name not in table.columns:
                raise unknown(f"{kind} column", name, columns)
    named = factors + responses
    twice = next((name for name in named if named.count(name) > 1), None)
    if twice is not None:
        raise UsageError(f"column {twice!r} is named twice; name each factor and response once")
    for name in factors:
        empty = int(table[name].isna().sum())
        if empty:
            raise UsageError(f"factor {name!r} is empty in {empty} runs; every run needs a level")
    if len(table) < 2:
        raise UsageError(f"need at least 2 runs to analyse, got {len(table)}")


def _numeric(column: pd.Series, name: str) -> pd.Series:
    values = pd.to_numeric(column, errors="coerce")
    bad = column[values.isna() & column.notna()]
    if len(bad):
        raise UsageError(f"response {name!r} is not numeric (e.g. {bad.iloc[0]!r}); give a column of numbers")
    return values.astype(float)


def _native(value):
    return value.item() if isinstance(value, np.generic) else value


def _levels(column: pd.Series, order: list) -> list:
    """The levels present, in the study file's order where given, then in order of first appearance."""
    present = [_native(value) for value in pd.unique(column)]
    known = [level for level in order if level in present]
    return known + [level for level in present if level not in known]


def _code(rows: pd.DataFrame, factors: list[str], level_order: dict, where: str) -> tuple[dict, np.ndarray, list]:
    """Each factor's levels, and each run's configuration as one number (first factor varies slowest)."""
    levels = {name: _levels(rows[name], level_order.get(name, [])) for name in factors}
    for name, found in levels.items():
        if len(found) < 2:
            raise UsageError(f"factor {name!r} has a single level ({found[0]!r}){where}; a factor needs two or more")
    codes = [pd.Categorical(rows[name], categories=levels[name]).codes for name in factors]
    shape = [len(levels[name]) for name in factors]
    return levels, np.ravel_multi_index(codes, shape), shape


def _layout(cell: np.ndarray, shape: list) -> tuple[str, int | None, str | None]:
    """Which analysis fits: (design, replicates or None when unbalanced, a note saying why it is not 2^k r)."""
    counts = np.bincount(cell, minlength=math.prod(shape))
    two_level = all(size == 2 for size in shape)
    balanced = counts.min() == counts.max()
    if two_level and balanced:
        return "2k", int(counts[0]), None
    prefix = "the 2^k r formulas need every configuration run equally often; " if two_level else ""
    if counts.min() == 0:
        return "anova", None, (f"{prefix}configurations without runs: {int((counts == 0).sum())} of {counts.size}, "
                               "so interactions cannot be estimated: main effects only")
    if not balanced:
        return "anova", None, (f"{prefix}unbalanced ({counts.min()} to {counts.max()} runs per configuration): "
                               "type II sums of squares, whose shares need not add up to 100")
    return "anova", int(counts[0]), None


def _terms(factors: list[str]) -> list[tuple[str, tuple[int, ...]]]:
    """Main effects, then two-factor interactions, and so on: ('A:B', (0, 1)) in the order of `factors`."""
    return [(":".join(factors[i] for i in combo), combo)
            for size in range(1, len(factors) + 1) for combo in itertools.combinations(range(len(factors)), size)]


def _percent(ss: float, sst: float) -> float:
    return 100.0 * ss / sst if sst > 0 else math.nan


# ---- the two analyses ------------------------------------------------------------------------------------

def _two_level(y: np.ndarray, cell: np.ndarray, factors: list[str], replicates: int, alpha: float) -> dict:
    """Jain's 2^k r allocation of variation, from the sign table over the 2^k configurations."""
    k, r = len(factors), replicates
    signs = np.array(list(itertools.product((-1, 1), repeat=k)))  # row j: configuration j, level 1 -> -1, 2 -> +1
    cell_mean = np.bincount(cell, weights=y) / r
    effects = {"mean": cell_mean.mean()}
    effects |= {name: signs[:, list(combo)].prod(axis=1) @ cell_mean / 2**k for name, combo in _terms(factors)}
    ss = {name: 2**k * r * q**2 for name, q in effects.items() if name != "mean"}
    sse = float(((y - cell_mean[cell]) ** 2).sum())
    sst = sum(ss.values()) + sse
    shares = {name: _percent(value, sst) for name, value in ss.items()}
    shares["error"] = _percent(sse, sst) if r > 1 else None
    ci = None
    if r > 1:
        df = 2**k * (r - 1)
        half = stats.t.ppf(1 - alpha / 2, df) * math.sqrt(sse / df) / math.sqrt(2**k * r)
        ci = {name: [q - half, q + half] for name, q in effects.items()}
    _, _, tests = _fit(y, cell, [2] * k, factors)  # F and p from statsmodels: the same sums of squares
    return {"variation_percent": shares, "effects": effects, "ci": ci} | tests


def _fit(y, cell, shape, factors):
    """The linear model of every term (main effects only when a configuration has no runs), its ANOVA table
    from statsmodels, and each term's F statistic and p-value (None for every term without residual degrees
    of freedom: one run per configuration leaves nothing to test against)."""
    from statsmodels.formula.api import ols
    from statsmodels.stats.anova import anova_lm

    complete = len(np.unique(cell)) == math.prod(shape)
    codes = np.unravel_index(cell, shape)
    frame = pd.DataFrame({f"f{i}": code for i, code in enumerate(codes)}).assign(y=y)  # safe names for any column
    formula = "y ~ " + (" * " if complete else " + ").join(f"C(f{i}, Sum)" for i in range(len(factors)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ols(formula, frame).fit()
        # type II backs its sums of squares out of F tests, which need residual degrees of freedom; without
        # them the design is one run per configuration, balanced, where type I gives the same sums
        table = anova_lm(model, typ=2 if model.df_resid > 0 else 1)
    names = {term: ":".join(factors[int(i)] for i in re.findall(r"\bf(\d+)\b", term))
             for term in table.index if term != "Residual"}
    tested = model.df_resid > 0
    tests = {"f": {name: (float(table.loc[term, "F"]) if tested else None) for term, name in names.items()},
             "p": {name: (float(table.loc[term, "PR(>F)"]) if tested else None) for term, name in names.items()},
             "df_residual": int(model.df_resid)}
    return model, table, tests


def _anova(y, cell, shape, levels, factors, alpha) -> dict:
    """Sum-to-zero ANOVA through statsmodels; each term's share of the total sum of squares. With a
    configuration missing, interactions cannot be estimated and only the main effects are fitted. Each level's
    effect is its mean minus the grand mean; `effect_ci` is the interval of that deviation (variance
    MSE (1/n_level - 1/N)), `ci` the interval of the level's mean."""
    model, table, tests = _fit(y, cell, shape, factors)
    codes = np.unravel_index(cell, shape)
    sst = float(((y - y.mean()) ** 2).sum())
    found = {":".join(factors[int(i)] for i in re.findall(r"\bf(\d+)\b", term)): ss
             for term, ss in table["sum_sq"].items() if term != "Residual"}
    shares = {name: _percent(found[name], sst) if name in found else None for name, _ in _terms(factors)}
    shares["error"] = _percent(table.loc["Residual", "sum_sq"], sst) if model.df_resid > 0 else None
    grand = float(y.mean())
    effects, ci = {"mean": grand}, ({} if model.df_resid > 0 else None)
    effect_ci = {} if ci is not None else None
    t = stats.t.ppf(1 - alpha / 2, model.df_resid) if ci is not None else math.nan
    for name, code in zip(factors, codes):
        chosen = {str(level): y[code == j] for j, level in enumerate(levels[name])}
        effects[name] = {level: values.mean() - grand for level, values in chosen.items()}
        if ci is not None:
            half = {level: t * math.sqrt(model.mse_resid / len(values)) for level, values in chosen.items()}
            ci[name] = {level: [values.mean() - half[level], values.mean() + half[level]]
                        for level, values in chosen.items()}
            spread = {level: t * math.sqrt(model.mse_resid * (1 / len(values) - 1 / len(y)))
                      for level, values in chosen.items()}
            effect_ci[name] = {level: [effects[name][level] - spread[level], effects[name][level] + spread[level]]
                               for level in chosen}
    return {"variation_percent": shares, "effects": effects, "ci": ci, "effect_ci": effect_ci} | tests


def mean_ci(values, alpha: float = 0.05) -> tuple[float, float, int]:
    """Mean, half-width of its t confidence interval from the values' own spread (NaN with one value), and
    how many numbers there were (non-numbers and NaN left out; (NaN, NaN, 0) when none)."""
    y = pd.to_numeric(pd.Series(values), errors="coerce").dropna().to_numpy(dtype=float)
    if len(y) == 0:
        return math.nan, math.nan, 0
    if len(y) == 1:
        return float(y[0]), math.nan, 1
    return float(y.mean()), float(stats.t.ppf(1 - alpha / 2, len(y) - 1) * y.std(ddof=1) / math.sqrt(len(y))), len(y)


def _cell_means(y, cell, shape, levels, factors, alpha) -> list[dict]:
    """Mean of each configuration that has runs, with a t-interval from its own spread."""
    means = []
    for index in np.unique(cell):
        mean, half, n = mean_ci(y[cell == index], alpha)
        position = np.unravel_index(index, shape)
        means.append({"levels": {name: levels[name][j] for name, j in zip(factors, position)}, "n": n,
                      "mean": mean, "ci": [mean - half, mean + half] if n > 1 else None})
    return means


def _plain(value):
    """Python numbers only, NaN as None: what json.dumps writes and reads back unchanged."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    value = _native(value)
    return None if isinstance(value, float) and not math.isfinite(value) else value


def analyze(table: pd.DataFrame, factors: list[str], responses: list[str], level_order: dict | None = None,
            alpha: float = 0.05) -> dict:
    """Each response's variation allocated to the factors and all their interactions, as JSON-able data.

    A response that lacks values in some runs is analysed on the others; when that changes the design, its
    entry carries its own "design", "replicates" and "note".
    """
    check_request(table, factors, responses, alpha)
    level_order = level_order or {}
    _, cell, shape = _code(table, factors, level_order, "")
    design, replicates, note = _layout(cell, shape)
    result = {"factors": list(factors), "design": design, "replicates": replicates}
    if note:
        result["note"] = note
    result["responses"] = {}
    for response in responses:
        y = _numeric(table[response], response)
        rows = table[y.notna()]
        if len(rows) < 2:
            raise UsageError(f"response {response!r} has a value in only {len(rows)} runs; need at least 2")
        levels, cell, shape = _code(rows, factors, level_order, f" among the runs with a value for {response!r}")
        own = _layout(cell, shape)
        values = y[y.notna()].to_numpy()
        if own[0] == "2k":
            entry = _two_level(values, cell, factors, own[1], alpha)
        else:
            entry = _anova(values, cell, shape, levels, factors, alpha)
        entry["means"] = _cell_means(values, cell, shape, levels, factors, alpha)
        if own != (design, replicates, note):
            entry |= {"design": own[0], "replicates": own[1]} | ({"note": own[2]} if own[2] else {})
        result["responses"][response] = entry
    return _plain(result)


@dataclass
class Analyses:
    """Each response of a study analysed on its own: results (response -> `analyze`'s result for it alone),
    missing (response -> runs with a number, fewer than 2: a counter this machine lacks, or too few runs
    done) and failed (response -> why the analysis refused it, e.g. a factor whose runs all failed)."""

    runs: int
    results: dict[str, dict] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def analyse_responses(table: pd.DataFrame, factors: list[str], responses: list[str],
                      level_order: dict | None = None, alpha: float = 0.05) -> Analyses:
    """What `distcnn study` prints and the report shows: one response without numbers in some configurations
    (a GPU figure on a CPU, a target never reached) must not take the others' analysis with it."""
    analyses = Analyses(len(table))
    for response in responses:
        found = int(pd.to_numeric(table[response], errors="coerce").notna().sum()) if response in table else 0
        if found < 2:
            analyses.missing[response] = found
            continue
        try:
            analyses.results[response] = analyze(table, factors, [response], level_order, alpha)
        except UsageError as error:
            analyses.failed[response] = str(error)
    return analyses
