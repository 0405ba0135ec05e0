"""What augmentation buys, as a study shows it: accuracy versus training images (train-subset as a factor),
robustness on the shifted test sets, over-augmentation (aug-strength as a factor) and time to a target
accuracy. Each is a Section of the report, written when the study's factors or figures call for it.
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pandas as pd

from distcnn import summary as declared
from distcnn.study import plots
from distcnn.study.analysis import mean_ci
from distcnn.study.document import Heading, Image, Table, Text
from distcnn.study.report.common import (ACCURACY, ALPHA, Section, Study, configuration_label, number, numeric)
from distcnn.study.store import option_name

SUBSET, STRENGTH = option_name("train_subset"), option_name("aug_strength")
SHIFT_MEAN, SHIFT_CLEAN = declared.key("shift_accuracy_mean"), declared.key("shift_clean_accuracy")
TARGET, IN_TRAINING = declared.key("target_accuracy"), declared.key("shifts_in_training")
TO_TARGET = tuple(declared.key(name) for name in ("time_to_target_seconds", "epochs_to_target", "images_to_target"))
MAX_THRESHOLDS = 4  # accuracies in the "training images needed" table


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
        points = [(level, *mean_ci(rows.loc[rows[x] == level, response], ALPHA))
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
    others = [name for name in study.factors if name != SUBSET]
    lines = curves(study, study.table, SUBSET, ACCURACY, others)
    palette = plots.colours(list(lines))
    ticks = [float(level) for level in _sorted_levels(study.level_order[SUBSET])]
    figure = plots.curves_figure(
        [{"title": ACCURACY, "xlabel": "training images (train-subset, log scale)", "ylabel": ACCURACY,
          "curves": lines, "xticks": ticks}], palette,
        f"accuracy versus data (bars: {100 * (1 - ALPHA):g}% CI from replicates)", log_x=True)
    levels = thresholds([m for _, means, _ in lines.values() for m in means if math.isfinite(m)],
                        study.spec.get("base", {}).get(TARGET))
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
    listed = rows[IN_TRAINING].dropna() if IN_TRAINING in rows else []
    return {name for text in listed for name in str(text).split(",") if name}


def robustness_section(study: Study) -> list:
    """Accuracy on the shifted test sets: per shift against severity, in-training shifts kept apart."""
    measured = _measured_shifts(study)
    table, others, scope = study.table, list(study.factors), ""
    if SUBSET in others:  # the best-trained models: the most training images
        largest = max(study.table[SUBSET].dropna(), key=float)
        table, others = table[table[SUBSET] == largest], [name for name in others if name != SUBSET]
        scope = f" Runs with {SUBSET}={largest} (the most training images)."
    trained = {}  # label -> shifts its policy trains on
    panels = []
    clean = table[SHIFT_CLEAN] if SHIFT_CLEAN in table else table[ACCURACY]
    for name in measured:
        long = pd.concat([table.assign(severity=0, value=clean)] + [
            table.assign(severity=s, value=table.get(declared.SHIFT_SEVERITY.column(name=name, severity=s)))
            for s in declared.SEVERITIES], ignore_index=True)
        long["value"] = pd.to_numeric(long["value"], errors="coerce")
        lines = curves(study, long, "severity", "value", others, [0, *declared.SEVERITIES])
        for label in lines:
            trained.setdefault(label, _in_training(_rows_of(table, label, others)))
        panels.append({"title": name, "xlabel": "severity (0: clean test set)", "ylabel": "accuracy",
                       "curves": lines, "xticks": [0, *declared.SEVERITIES],
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
        means = {name: mean_ci(runs[declared.SHIFT.column(name=name)], ALPHA)[0] for name in measured}
        split = [[means[name] for name in measured if (name in inside) == flag] for flag in (True, False)]
        outside = [name for name in measured if name not in inside]
        reference = _unaugmented_mean(study, runs, outside)
        clean = runs[SHIFT_CLEAN] if SHIFT_CLEAN in runs else runs[ACCURACY]
        rows.append([label, number(mean_ci(clean, ALPHA)[0], "fraction"),
                     *(number(means[name], "fraction") + (" †" if name in inside else "") for name in measured),
                     *(number(sum(part) / len(part), "fraction") if part else "none" for part in split),
                     number(reference, "fraction") if reference is not None and outside else "n/a",
                     number(mean_ci(runs[SHIFT_MEAN], ALPHA)[0], "fraction") if SHIFT_MEAN in runs else "n/a"])
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
    values = [mean_ci(table.loc[unaugmented, declared.SHIFT.column(name=name)], ALPHA)[0] for name in shifts]
    values = [value for value in values if math.isfinite(value)]
    return sum(values) / len(values) if values and len(values) == len(shifts) else None


def _rows_of(table: pd.DataFrame, label: str, factors: list[str]) -> pd.DataFrame:
    if not factors:
        return table
    return table[table.apply(lambda row: configuration_label(row, factors), axis=1) == label]


def strength_section(study: Study) -> list:
    """Over-augmentation: accuracy against the augmentation strength, and where it turns down."""
    others = [name for name in study.factors if name != STRENGTH]
    responses = [ACCURACY] + ([SHIFT_MEAN] if numeric(study.table, SHIFT_MEAN) else [])
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
        rows.append([label, f"{strengths[peak]:g}", number(means[peak], "fraction"),
                     number(means[-1], "fraction") + f" (at {strengths[-1]:g})", turns])
    return [Heading("Over-augmentation"), Image(
        "augmentation_strength", figure, f"Mean response against {STRENGTH} (0: no augmentation, 1: the policy "
                                         f"as defined), one line per configuration of the other factors."),
            Text(f"Where mean {ACCURACY} turns down: the strength with the highest mean; a stronger policy than "
                 f"that buys less accuracy (compare the drop with the confidence intervals in the plot)."),
            Table(["configuration", "best strength", f"mean {ACCURACY} there", "at the strongest",
                   "accuracy turns down"], rows)]


def target_section(study: Study) -> list:
    """Time to accuracy: how many runs reached the target, and the wall time, epochs and images it took."""
    rows = []
    for label in study.configurations:
        runs = study.table[study.labels == label]
        reached = pd.to_numeric(runs.get("time_to_target_seconds"), errors="coerce").notna()
        cells = []
        for name in TO_TARGET:
            mean, half, n = mean_ci(runs.loc[reached, name], ALPHA) if reached.any() else (math.nan, math.nan, 0)
            cells.append("not reached" if n == 0 else number(mean, declared.unit(name)) + (
                f" ± {number(half, declared.unit(name))}" if math.isfinite(half) else ""))
        targets = sorted(set(pd.to_numeric(runs[TARGET], errors="coerce").dropna()))
        rows.append([label, ", ".join(f"{t:g}" for t in targets), f"{int(reached.sum())} of {len(runs)}", *cells])
    return [Heading("Time to accuracy"), Text(
        "Wall seconds (training and validation of every epoch, up to and including the first epoch whose "
        "validation accuracy reached the target), epochs and training images to get there: means ± CI over the "
        "runs that reached it."), Table(["configuration", "target", "reached", "seconds", "epochs", "images"], rows)]


def _measured_shifts(study: Study) -> list[str]:
    return [name for name in declared.SHIFT_NAMES if numeric(study.table, declared.SHIFT.column(name=name))]


SECTIONS = (  # in the report's order
    Section("time to accuracy", lambda study: numeric(study.table, TARGET), target_section),
    Section("accuracy versus data", lambda study: SUBSET in study.factors and numeric(study.table, ACCURACY),
            data_section),
    Section("robustness", lambda study: bool(_measured_shifts(study)), robustness_section),
    Section("over-augmentation", lambda study: STRENGTH in study.factors and numeric(study.table, ACCURACY),
            strength_section),
)
