"""`distcnn report STUDY_DIR`: one page that answers the study — which factor moves which response, at what
cost — as STUDY_DIR/report.html (self-contained: plots inline, no network, no scripts) and its Markdown twin
STUDY_DIR/report.md (plots in report_files/). Both are rendered from the same blocks, so they cannot disagree.

Reads only study.db and the run records; a study still running or with failed runs gets a report of what is
done, and a response without numbers (a counter this machine lacks) is named and skipped, never plotted as 0.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from distcnn.errors import UsageError
from distcnn.study import plots
from distcnn.study.document import FILES, Heading, Image, Table, Text, to_html, to_markdown
from distcnn.study.analysis import analyze
from distcnn.shifts import SEVERITIES, SHIFT_NAMES
from distcnn.study.store import DATABASE, load_runs_table, open_study, option_name
from distcnn.record import ENVIRONMENT, write_atomic
from distcnn.telemetry.show import human_bytes, read_series

HTML_NAME, MARKDOWN_NAME = "report.html", "report.md"
ALPHA = 0.05
ACCURACY = "test_accuracy"
COSTS = ("train_seconds", "cpu_seconds_total", "net_bytes_total")  # the first, and the first other one present


# ---- formatting --------------------------------------------------------------------------------------------

def number(value, name: str = "") -> str:
    """A figure as its kind reads best: accuracies to 4 decimals, percentages to 1, bytes in KiB/MiB/GiB."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if "accuracy" in name:
        return f"{value:.4f}"
    if "percent" in name:
        return f"{value:.1f}"
    if "bytes" in name:
        return human_bytes(value)
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


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
        recorded = Path(row["run_dir"])
        return recorded if recorded.is_dir() else self.directory / recorded.parent.name / recorded.name


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


def analyse(study: Study) -> tuple[dict[str, dict], list[str]]:
    """Each response's analysis (response by response, so one without numbers is skipped, not fatal), and
    a line for each one skipped."""
    analysed, skipped = {}, []
    for response in study.spec.get("responses", []):
        found = int(pd.to_numeric(study.table[response], errors="coerce").notna().sum()) \
            if response in study.table else 0
        if found < 2:
            skipped.append(f"{response}: skipped, a number in {found} of {len(study.table)} runs "
                           f"(unavailable on this machine, or too few runs done)")
            continue
        try:
            result = analyze(study.table, study.factors, [response], study.level_order, ALPHA)
        except UsageError as error:
            skipped.append(f"{response}: not analysed: {error}")
            continue
        entry = result["responses"][response]
        analysed[response] = {"design": result["design"], "replicates": result["replicates"],
                              "note": result.get("note")} | entry
    return analysed, skipped


# ---- the sections ------------------------------------------------------------------------------------------

def overview(study: Study) -> list:
    spec, k = study.spec, len(study.factors)
    counts = {status: sum(run["status"] == status for run in study.runs) for status in ("done", "failed")}
    waiting = len(study.runs) - sum(counts.values())
    sizes = [len(study.level_order[name]) for name in study.factors]
    design = (f"A 2^{k} r design (k = {k} two-level factors, r = {spec['replicates']} replicates)"
              if spec.get("design") == "2k" else
              f"A full factorial design ({' × '.join(map(str, sizes))} levels, {spec['replicates']} replicates)")
    factors = "; ".join(f"{name}: {', '.join(map(str, study.level_order[name]))}" for name in study.factors)
    seconds = sum(run["seconds"] or 0 for run in study.runs)
    base = ", ".join(f"{option_name(key)}={value}" for key, value in spec.get("base", {}).items()) or "defaults"
    return [Heading(f"Study {spec.get('name', study.directory.name)}", 1), Text(
        f"{design} — factors {factors}. {len(study.runs)} runs planned: {counts['done']} done, "
        f"{counts['failed']} failed" + (f", {waiting} not run yet" if waiting else "") +
        f"; total run time {duration(seconds)} (the sum of every run's time, failed ones included). "
        f"Options shared by every run: {base}. Responses: {', '.join(spec.get('responses', []))}. "
        f"Data: {study.directory / DATABASE} indexes the run records (in {study.run_dir(study.table.iloc[0]).parent}); "
        f"distcnn analyze {study.directory} prints the same analysis.")]


def _cell_mean(mean: dict, response: str, runs: int) -> str:
    text = number(mean["mean"], response)
    if mean["ci"]:
        text += f" ± {number((mean['ci'][1] - mean['ci'][0]) / 2, response)}"
    return text + (f" (n={mean['n']})" if mean["n"] != runs else "")


def means_section(study: Study, analysed: dict) -> list:
    runs = study.labels.value_counts()
    by_label = {response: {configuration_label(mean["levels"], study.factors): mean for mean in entry["means"]}
                for response, entry in analysed.items()}
    rows = []
    for label in study.configurations:
        levels = study.table[study.labels == label].iloc[0]
        rows.append([str(levels[name]) for name in study.factors] + [str(runs[label])] +
                    [_cell_mean(by_label[r][label], r, runs[label]) if label in by_label[r] else "n/a"
                     for r in analysed])
    return [Heading("Means per configuration"), Text(
        f"Mean of each response per configuration ± the half-width of its {100 * (1 - ALPHA):g}% confidence "
        f"interval (from its replicates; n when fewer runs than the configuration's have a value)."),
        Table([*study.factors, "runs", *analysed], rows)]


def _effect_cells(entry: dict) -> dict[str, str]:
    """term -> 'effect [CI]' (2^k r), or 'factor = level' -> deviation from the grand mean (ANOVA)."""
    cells, ci = {}, entry["ci"] or {}
    for term, effect in entry["effects"].items():
        if isinstance(effect, dict):
            cells |= {f"{term} = {level}": f"{value:+.4g}" for level, value in effect.items()}
        else:
            interval = ci.get(term)
            cells[term] = f"{effect:.4g}" + (f" [{interval[0]:.4g}, {interval[1]:.4g}]" if interval else "")
    return cells


def variation_section(analysed: dict, skipped: list[str]) -> list:
    blocks = [Heading("Allocation of variation"), Text(
        "Share of the total variation (sum of squares) of each response that each factor and interaction "
        "explains, in %; error is the variation between replicates that no factor explains. The largest share "
        "of each response is in bold.")]
    blocks += [Text(line) for line in skipped]
    if not analysed:
        return blocks + [Text("No response could be analysed.")]
    terms = list(next(iter(analysed.values()))["variation_percent"])
    rows, bold = [[term] for term in terms], set()
    for column, entry in enumerate(analysed.values(), start=1):
        shares = entry["variation_percent"]
        for row, term in enumerate(terms):
            rows[row].append(number(shares.get(term), "percent"))
        present = [value for value in shares.values() if value is not None]
        bold |= {(row, column) for row, term in enumerate(terms) if present and shares.get(term) == max(present)}
    blocks.append(Table(["term", *analysed], rows, bold))
    if any(entry["variation_percent"].get("error") is None for entry in analysed.values()):
        blocks.append(Text("Without replicates there is no error term: the highest interaction also holds the "
                           "noise, and there are no confidence intervals."))
    notes = {entry["note"] for entry in analysed.values() if entry.get("note")}
    blocks += [Text(f"Note: {note}") for note in sorted(notes)]
    blocks += [Text(f"{response}: every run measured the same value; there is no variation to allocate.")
               for response, entry in analysed.items() if all(v is None for v in entry["variation_percent"].values())]
    cells = {response: _effect_cells(entry) for response, entry in analysed.items()}
    names = list(dict.fromkeys(name for column in cells.values() for name in column))
    two_level = all(entry["design"] == "2k" for entry in analysed.values())
    blocks += [Heading("Effects", 3), Text(
        f"2^k r effects q: half the change of the response from the first level to the second, with the "
        f"{100 * (1 - ALPHA):g}% confidence interval; an interval that contains 0 is no evidence of an effect."
        if two_level else "Effects: each level's mean minus the grand mean (ANOVA, sum-to-zero)."),
        Table(["effect", *analysed], [[name] + [cells[r].get(name, "") for r in analysed] for name in names])]
    return blocks


def effect_plots(study: Study, analysed: dict) -> list:
    if not analysed:
        return []
    arguments = (study.table, study.factors, study.level_order, list(analysed), ALPHA)
    blocks = [Heading("Main effects"), Image("main_effects", plots.main_effects_figure(*arguments),
                                               "Mean response at each level of each factor, with confidence "
                                               "intervals from the pooled replicate error.")]
    interactions = plots.interactions_figure(*arguments)
    if interactions:
        blocks += [Heading("Interactions"), Image("interactions", interactions,
                                                  "Mean response per pair of levels: parallel lines mean the "
                                                  "factors act independently; crossing lines, an interaction.")]
    return blocks


def resources_section(study: Study) -> list:
    runs, missing = [], []
    for index, row in study.table.iterrows():
        try:
            series = {rank: rows for rank, rows in read_series(study.run_dir(row)).items() if rows}
        except UsageError as error:
            series, missing = {}, missing + [f"{row['run_id']} ({error})"]
        if series:
            runs.append((study.labels[index], series))
    blocks = [Heading("Resources over time")]
    if runs:
        blocks.append(Image("resources", plots.resources_figure(runs, plots.colours(study.configurations)),
                            "Each run's resource use over its elapsed time, coloured by configuration; host-wide "
                            "figures from the host of rank 0. distcnn show RUN_DIR draws one run in full."))
    if missing or not runs:
        blocks.append(Text("No telemetry for: " + ", ".join(missing) if missing else "No run recorded telemetry."))
    return blocks


def _numeric(table: pd.DataFrame, column: str) -> bool:
    return column in table and pd.to_numeric(table[column], errors="coerce").notna().any()


def pareto_section(study: Study) -> list:
    blocks = [Heading("Accuracy versus cost (Pareto)")]
    costs = [cost for cost in COSTS if _numeric(study.table, cost)]
    if not _numeric(study.table, ACCURACY) or not costs:
        return blocks + [Text(f"No {ACCURACY} or cost figures recorded: nothing to compare.")]
    costs = costs[:2]
    table = study.table.assign(**{name: pd.to_numeric(study.table[name], errors="coerce")
                                  for name in (ACCURACY, *costs)})
    blocks.append(Image("pareto", plots.pareto_figure(table, study.labels, plots.colours(study.configurations),
                                                      costs, ACCURACY),
                        f"{ACCURACY} against cost; the dashed step line joins the configuration means that no "
                        f"other configuration beats on both cost and accuracy."))
    means = table.groupby(study.labels)[[ACCURACY, *costs]].mean()
    fronts = [{label for *_, label in plots.pareto_front(
        [(x, y, label) for label, (x, y) in means[[cost, ACCURACY]].dropna().iterrows()])} for cost in costs]
    rows = [[label, *(number(means.loc[label, name], name) for name in (ACCURACY, *costs)),
             *("✓" if label in front else "" for front in fronts)] for label in study.configurations]
    return blocks + [Table(["configuration", f"mean {ACCURACY}", *(f"mean {cost}" for cost in costs),
                            *(f"on the front by {cost}" for cost in costs)], rows)]


# ---- what augmentation buys: data efficiency, robustness, over-augmentation, time to accuracy ---------------

SUBSET, STRENGTH = "train-subset", "aug-strength"
SHIFT_MEAN = "shift_accuracy_mean"
MAX_THRESHOLDS = 4  # accuracies in the "training images needed" table


def mean_ci(values) -> tuple[float, float, int]:
    """Mean, half-width of its t confidence interval (NaN with one value) and count of the numbers given."""
    y = pd.to_numeric(pd.Series(values), errors="coerce").dropna().to_numpy(dtype=float)
    if len(y) == 0:
        return math.nan, math.nan, 0
    if len(y) == 1:
        return float(y[0]), math.nan, 1
    return float(y.mean()), float(stats.t.ppf(1 - ALPHA / 2, len(y) - 1) * y.std(ddof=1) / math.sqrt(len(y))), len(y)


def _sorted_levels(levels: list) -> list:
    return sorted(levels, key=float) if all(isinstance(level, (int, float)) for level in levels) else list(levels)


def curves(study: Study, table: pd.DataFrame, x: str, response: str, by: list[str],
           x_levels: list | None = None) -> dict[str, tuple]:
    """Per configuration of the factors `by` (in the study file's order): the mean response (with CI) at each
    level of x (a factor, or a column whose levels are given), as (levels, means, halves) where it has numbers."""
    out = {}
    if response not in table:
        return out
    for levels in product(*(study.level_order[name] for name in by)):
        rows = table
        for name, level in zip(by, levels):
            rows = rows[rows[name] == level]
        points = [(level, *mean_ci(rows.loc[rows[x] == level, response]))
                  for level in (x_levels or _sorted_levels(study.level_order[x]))]
        points = [point for point in points if point[3] > 0]
        if points:
            label = configuration_label(dict(zip(by, levels)), by) if by else "all runs"
            out[label] = tuple(list(column) for column in zip(*points))[:3]
    return out


def data_needed(amounts: list[float], means: list[float], accuracy: float) -> str:
    """Training images needed to reach `accuracy` on one curve: the first crossing, interpolated linearly in
    log(images) between the two measured amounts around it."""
    for i, (amount, mean) in enumerate(zip(amounts, means)):
        if mean >= accuracy:
            if i == 0:
                return f"≤ {amount:,.0f} (reached at the smallest amount)"
            before, below = amounts[i - 1], means[i - 1]
            share = (accuracy - below) / (mean - below)
            needed = math.exp(math.log(before) + share * (math.log(amount) - math.log(before)))
            return f"{amount:,.0f} (measured)" if share >= 1 else f"≈ {needed:,.0f} (interpolated)"
    return "not reached"


def thresholds(means: list[float], target: float | None) -> list[float]:
    """A few round accuracies inside the measured range (multiples of 0.05, else of 0.01), and the study's
    target accuracy when it has one."""
    low, high = min(means), max(means)
    chosen = []
    for step in (0.05, 0.01):
        grid = [k * step for k in range(math.floor(low / step) + 1, math.floor(high / step + 1e-9) + 1)]
        if grid:
            picks = np.linspace(0, len(grid) - 1, min(MAX_THRESHOLDS, len(grid))).round().astype(int)
            chosen = [round(grid[i], 2) for i in sorted(set(picks))]
            break
    if target is not None:
        chosen.append(float(target))
    return sorted(set(chosen)) or [round(high, 2)]


def data_section(study: Study) -> list:
    """Accuracy versus training images (train-subset as a factor), and the images each curve needs."""
    if SUBSET not in study.factors or not _numeric(study.table, ACCURACY):
        return []
    others = [name for name in study.factors if name != SUBSET]
    lines = curves(study, study.table, SUBSET, ACCURACY, others)
    palette = plots.colours(list(lines))
    ticks = [float(level) for level in _sorted_levels(study.level_order[SUBSET])]
    figure = plots.curves_figure(
        [{"title": ACCURACY, "xlabel": "training images (train-subset, log scale)", "ylabel": ACCURACY,
          "curves": lines, "xticks": ticks}], palette,
        f"accuracy versus data (bars: {100 * (1 - ALPHA):g}% CI from replicates)", log_x=True)
    levels = thresholds([m for _, means, _ in lines.values() for m in means if math.isfinite(m)],
                        study.spec.get("base", {}).get("target_accuracy"))
    rows = [[label, *(data_needed(amounts, means, level) for level in levels)]
            for label, (amounts, means, _) in lines.items()]
    return [Heading("Accuracy versus data"), Image("accuracy_vs_data", figure,
                                                   f"Mean {ACCURACY} against the training images of each run, one "
                                                   f"line per configuration of the other factors."),
            Text("Training images needed to reach each accuracy (mean test accuracy): the first measured amount "
                 "that reaches it, interpolated linearly in log(images) from the amount before it; an estimate "
                 "between measured levels, not a measurement."),
            Table(["configuration", *(f"images for {level:.2f}" for level in levels)], rows)]


def _in_training(rows: pd.DataFrame) -> set[str]:
    listed = rows["shifts_in_training"].dropna() if "shifts_in_training" in rows else []
    return {name for text in listed for name in str(text).split(",") if name}


def robustness_section(study: Study) -> list:
    """Accuracy on the shifted test sets: per shift against severity, in-training shifts kept apart."""
    measured = [name for name in SHIFT_NAMES if _numeric(study.table, f"shift_{name}_accuracy")]
    if not measured:
        return []
    table, others, scope = study.table, list(study.factors), ""
    if SUBSET in others:  # the best-trained models: the most training images
        largest = max(study.table[SUBSET].dropna(), key=float)
        table, others = table[table[SUBSET] == largest], [name for name in others if name != SUBSET]
        scope = f" Runs with {SUBSET}={largest} (the most training images)."
    trained = {}  # label -> shifts its policy trains on
    panels = []
    clean = table["shift_clean_accuracy"] if "shift_clean_accuracy" in table else table[ACCURACY]
    for name in measured:
        long = pd.concat([table.assign(severity=0, value=clean)] + [
            table.assign(severity=severity, value=table.get(f"shift_{name}_s{severity}_accuracy"))
            for severity in SEVERITIES], ignore_index=True)
        long["value"] = pd.to_numeric(long["value"], errors="coerce")
        lines = curves(study, long, "severity", "value", others, [0, *SEVERITIES])
        for label in lines:
            trained.setdefault(label, _in_training(_rows_of(table, label, others)))
        panels.append({"title": name, "xlabel": "severity (0: clean test set)", "ylabel": "accuracy",
                       "curves": lines, "xticks": [0, *SEVERITIES],
                       "dashed": {label for label in lines if name in trained[label]}})
    figure = plots.curves_figure(panels, plots.colours(list(trained)),
                                 "accuracy on shifted test sets (dashed: the policy trains on this shift)",
                                 dashed_label="the policy trains on this shift")
    header = ["configuration", "unshifted accuracy", *measured, "in training (mean)", "not in training (mean)",
              "the same shifts, unaugmented runs", SHIFT_MEAN]
    rows = []
    for label in study.configurations:
        runs = study.table[study.labels == label]
        inside = _in_training(runs)
        means = {name: mean_ci(runs[f"shift_{name}_accuracy"])[0] for name in measured}
        split = [[means[name] for name in measured if (name in inside) == flag] for flag in (True, False)]
        outside = [name for name in measured if name not in inside]
        reference = _unaugmented_mean(study, runs, outside)
        clean = runs["shift_clean_accuracy"] if "shift_clean_accuracy" in runs else runs[ACCURACY]
        rows.append([label, number(mean_ci(clean)[0], ACCURACY),
                     *(number(means[name], "accuracy") + (" †" if name in inside else "") for name in measured),
                     *(number(sum(part) / len(part), "accuracy") if part else "none" for part in split),
                     number(reference, "accuracy") if reference is not None and outside else "n/a",
                     number(mean_ci(runs[SHIFT_MEAN])[0], "accuracy") if SHIFT_MEAN in runs else "n/a"])
    return [Heading("Robustness to shifted test sets"), Image(
        "robustness", figure, "Mean accuracy against the severity of each shift of the test set (0: the same "
                              "test images unshifted), one line per configuration; dashed where the policy trains "
                              f"on that shift (in distribution), solid where it does not.{scope}"),
        Text("Mean accuracy per shift over its severities, on the images the shifts were scored on "
             "(--shift-images: a fixed subset of the test set; unshifted accuracy: those images as they are); "
             "† marks a shift the configuration's policy trains on. "
             "Gains on those are in-distribution. The shifts not in training differ from policy to policy, so "
             "their mean is set beside the mean of the unaugmented runs (policy none or aug-strength 0, at the "
             "same levels of the other factors) over the same shifts: the difference is the out-of-distribution "
             "gain."), Table(header, rows)]


def _unaugmented_mean(study: Study, runs: pd.DataFrame, shifts: list[str]) -> float | None:
    """The mean accuracy over `shifts` of the study's unaugmented runs (policy none or aug-strength 0) that
    share the other factors' levels with `runs` (train-subset, model, …); None when the study has none."""
    table = study.table
    unaugmented = pd.Series(False, index=table.index)
    if "policy" in table:
        unaugmented |= table["policy"] == "none"
    if STRENGTH in table:
        unaugmented |= pd.to_numeric(table[STRENGTH], errors="coerce") == 0
    same = [name for name in study.factors if name not in ("policy", STRENGTH)]
    for name in same:
        unaugmented &= table[name] == runs[name].iloc[0]
    values = [mean_ci(table.loc[unaugmented, f"shift_{name}_accuracy"])[0] for name in shifts]
    values = [value for value in values if math.isfinite(value)]
    return sum(values) / len(values) if values and len(values) == len(shifts) else None


def _rows_of(table: pd.DataFrame, label: str, factors: list[str]) -> pd.DataFrame:
    if not factors:
        return table
    return table[table.apply(lambda row: configuration_label(row, factors), axis=1) == label]


def strength_section(study: Study) -> list:
    """Over-augmentation: accuracy against the augmentation strength, and where it turns down."""
    if STRENGTH not in study.factors or not _numeric(study.table, ACCURACY):
        return []
    others = [name for name in study.factors if name != STRENGTH]
    responses = [ACCURACY] + ([SHIFT_MEAN] if _numeric(study.table, SHIFT_MEAN) else [])
    by_response = {response: curves(study, study.table, STRENGTH, response, others) for response in responses}
    labels = list(dict.fromkeys(label for lines in by_response.values() for label in lines))
    ticks = [float(level) for level in _sorted_levels(study.level_order[STRENGTH])]
    figure = plots.curves_figure([{"title": response, "xlabel": STRENGTH, "ylabel": response, "curves": lines,
                                   "xticks": ticks} for response, lines in by_response.items()],
                                 plots.colours(labels),
                                 f"accuracy versus augmentation strength (bars: {100 * (1 - ALPHA):g}% CI)")
    rows = []
    for label, (strengths, means, halves) in by_response[ACCURACY].items():
        peak = int(np.nanargmax(means))
        turns = (f"after {STRENGTH} {strengths[peak]:g}" if peak < len(strengths) - 1 else
                 "not within the strengths tried")
        rows.append([label, f"{strengths[peak]:g}", number(means[peak], ACCURACY),
                     number(means[-1], ACCURACY) + f" (at {strengths[-1]:g})", turns])
    return [Heading("Over-augmentation"), Image(
        "augmentation_strength", figure, f"Mean response against {STRENGTH} (0: no augmentation, 1: the policy "
                                         f"as defined), one line per configuration of the other factors."),
            Text(f"Where mean {ACCURACY} turns down: the strength with the highest mean; a stronger policy than "
                 f"that buys less accuracy (compare the drop with the confidence intervals in the plot)."),
            Table(["configuration", "best strength", f"mean {ACCURACY} there", "at the strongest",
                   "accuracy turns down"], rows)]


def target_section(study: Study) -> list:
    """Time to accuracy: how many runs reached the target, and the wall time, epochs and images it took."""
    if not _numeric(study.table, "target_accuracy"):
        return []
    rows = []
    for label in study.configurations:
        runs = study.table[study.labels == label]
        reached = pd.to_numeric(runs.get("time_to_target_seconds"), errors="coerce").notna()
        cells = []
        for name in ("time_to_target_seconds", "epochs_to_target", "images_to_target"):
            mean, half, n = mean_ci(runs.loc[reached, name]) if reached.any() else (math.nan, math.nan, 0)
            cells.append("not reached" if n == 0 else number(mean, name) + (
                f" ± {number(half, name)}" if math.isfinite(half) else ""))
        targets = sorted(set(pd.to_numeric(runs["target_accuracy"], errors="coerce").dropna()))
        rows.append([label, ", ".join(f"{t:g}" for t in targets), f"{int(reached.sum())} of {len(runs)}", *cells])
    return [Heading("Time to accuracy"), Text(
        "Wall seconds (training and validation of every epoch, up to and including the first epoch whose "
        "validation accuracy reached the target), epochs and training images to get there: means ± CI over the "
        "runs that reached it."), Table(["configuration", "target", "reached", "seconds", "epochs", "images"], rows)]


def failed_section(study: Study) -> list:
    failed = [run for run in study.runs if run["status"] == "failed"]
    if not failed:
        return []
    rows = [[run["run_id"], configuration_label({option_name(k): v for k, v in run["levels"].items()}, study.factors),
             str(run["attempts"]), run["error"] or ""] for run in failed]
    return [Heading("Failed runs"), Table(["run", "configuration", "attempts", "error"], rows)]


def environment_section(study: Study) -> list:
    first = study.table.iloc[0]
    path = study.run_dir(first) / ENVIRONMENT
    blocks = [Heading("Environment")]
    try:
        environment = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return blocks + [Text(f"Cannot read {path}: {error}")]
    return blocks + [Text(f"As recorded by run {first['run_id']} ({path})."),
                     Table(["figure", "value"], [[key, plain(value)] for key, value in environment.items()])]


# ---- the report --------------------------------------------------------------------------------------------

def report_blocks(study: Study) -> list:
    analysed, skipped = analyse(study)
    return [*overview(study), *means_section(study, analysed), *variation_section(analysed, skipped),
            *effect_plots(study, analysed), *resources_section(study), *pareto_section(study),
            *target_section(study), *data_section(study), *robustness_section(study), *strength_section(study),
            *failed_section(study), *environment_section(study)]


def write_report(study_dir: str | Path) -> tuple[Path, Path]:
    """Write STUDY_DIR/report.html and report.md (plots in report_files/), each file atomically."""
    study = load_study(study_dir)
    blocks = report_blocks(study)
    for image in (block for block in blocks if isinstance(block, Image)):
        write_atomic(study.directory / FILES / f"{image.name}.png", lambda handle, data=image.png: handle.write(data),
                     binary=True)
    html_path, md_path = study.directory / HTML_NAME, study.directory / MARKDOWN_NAME
    page, twin = to_html(blocks[0].text, blocks), to_markdown(blocks)
    write_atomic(md_path, lambda handle: handle.write(twin))
    write_atomic(html_path, lambda handle: handle.write(page))
    return html_path, md_path


def command_report(args: argparse.Namespace) -> int:
    html_path, md_path = write_report(args.study_dir)
    print(f"report: {html_path}")
    print(f"markdown: {md_path}")
    return 0
