"""The report's sections on the runs themselves: one row per planned run (its configuration, replicate, seed,
status, key responses and a link to its folder), its validation curves per epoch, where a training step's time
goes and what it sends, and how well the fitted model's residuals behave."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from distcnn import summary as declared
from distcnn.errors import UsageError
from distcnn.record import RunRecord
from distcnn.study import plots
from distcnn.study.document import Heading, Image, Link, Table, Text
from distcnn.study.report import figures
from distcnn.study.report.common import Study, configuration_label, response_scale, values
from distcnn.study.store import option_name
from distcnn.units import scale, with_unit

KEY_RESPONSES = 3  # the per-run table shows the study's first responses: it has to fit a page
EPOCH_FIGURES = (("val_accuracy", "validation accuracy (0–1)"), ("val_loss", "validation loss"))
PHASES = declared.PHASES
COMM = declared.key("comm_bytes_per_step")


def _folder(study: Study, run: dict) -> Link | str:
    """A link to a run's folder, relative to the report where it lies under the study."""
    if not run["run_dir"]:
        return ""
    path = study.run_dir(run)
    try:
        href = os.path.relpath(path, study.directory)
    except ValueError:  # another drive
        href = path.as_uri()
    return Link(Path(run["run_dir"]).name, href.replace(os.sep, "/") + "/")


def runs_section(study: Study) -> list:
    """One row per planned run, done or not: the table a reader checks the study against."""
    keys = list(study.spec.get("responses", []))[:KEY_RESPONSES]
    by_id = study.table.set_index("run_id")
    scales = {name: response_scale(study.table, name) for name in keys}
    rows = []
    seconds = scale([run["seconds"] for run in study.runs], "s", 3)
    for run in sorted(study.runs, key=lambda run: (run["config_index"], run["replicate"])):
        levels = {option_name(key): value for key, value in run["levels"].items()}
        done = run["status"] == "done" and run["run_id"] in by_id.index
        figures_ = [scales[name].text(by_id.loc[run["run_id"]].get(name)) if done else "" for name in keys]
        rows.append([_folder(study, run) or run["run_id"], configuration_label(levels, study.factors),
                     f"{run['replicate']} / {run['seed']}", run["status"],
                     seconds.text(run["seconds"]) if run["seconds"] is not None else "", *figures_])
    return [Heading("Runs"), *_side_by_side(study), Text(
        f"Every planned run ({len(study.runs)}): its folder (run records: config.json, environment.json, "
        f"epochs.csv, summary.json), configuration, replicate and seed, status, wall time and the study's first "
        f"responses; distcnn show FOLDER prints one in full, distcnn export writes them all as one table."),
        Table(["run", "configuration", "replicate / seed", "status", "run time (s)",
               *(with_unit(name, scales[name].label) for name in keys)], rows)]


def _side_by_side(study: Study) -> list:
    """Which runs shared the machine (--parallel): their resource figures are not those of a run alone."""
    shared = {run["run_id"]: (run.get("placement") or {}).get("alongside") for run in study.runs}
    shared = {run_id: beside for run_id, beside in shared.items() if beside}
    if not shared:
        return []
    pairs = "; ".join(f"{run_id} beside {', '.join(beside)}" for run_id, beside in sorted(shared.items()))
    return [Text(f"Runs that ran side by side on one machine (--parallel), each on its own cores or GPUs but "
                 f"sharing memory bandwidth, caches and disk: {pairs}. Their resource figures are not comparable "
                 f"with those of runs that ran alone; runs_alongside (in distcnn export and analyze) is a column "
                 f"to block on, e.g. distcnn analyze STUDY_DIR --factors ...,runs_alongside.")]


def _epochs(study: Study) -> dict[str, list[pd.DataFrame]]:
    """Each configuration's epochs.csv tables (one per run that has one)."""
    found: dict[str, list[pd.DataFrame]] = {}
    for index, row in study.table.iterrows():
        try:
            rows = RunRecord(study.run_dir(row)).read_epochs()
        except (OSError, UsageError):
            rows = []
        if rows:
            frame = pd.DataFrame(rows).apply(pd.to_numeric, errors="coerce")  # a text cell: not a figure
            found.setdefault(study.labels[index], []).append(frame)
    return found


def epochs_section(study: Study) -> list:
    blocks = [Heading("Validation per epoch")]
    tables = _epochs(study)
    if not tables:
        return blocks + [Text("No run recorded epochs.csv.")]
    curves: dict[str, dict] = {}
    for column, title in EPOCH_FIGURES:
        lines = {}
        for label in study.configurations:
            frames = [frame[["epoch", column]].dropna() for frame in tables.get(label, []) if column in frame]
            if frames and any(len(frame) for frame in frames):
                grouped = pd.concat(frames).groupby("epoch")[column]
                lines[label] = (grouped.mean().index.to_numpy(), grouped.mean().to_numpy(),
                                grouped.min().to_numpy(), grouped.max().to_numpy())
        curves[title] = lines
    missing = [title for title, lines in curves.items() if not lines]
    blocks.append(Image("epochs", figures.epochs_figure(curves, plots.colours(study.configurations)),
                        "Validation accuracy and loss after each epoch, per configuration (from each run's "
                        "epochs.csv)."))
    return blocks + ([Text(f"Unavailable (not in epochs.csv): {', '.join(missing)}.")] if missing else [])


def steps_section(study: Study) -> list:
    """Each configuration's mean step, phase by phase (ms), and the gradient bytes a rank sends per step."""
    blocks = [Heading("Step time and communication")]
    columns = [declared.STEP.column(phase=phase) for phase in PHASES]
    step = declared.STEP.column(phase="step")
    table = study.table.assign(**{name: values(study.table, name) for name in [*columns, step, COMM]})
    means = table.groupby(study.labels)[[*columns, step, COMM]].mean()
    if means[[*columns, step]].isna().all().all():
        return blocks + [Text("No run timed its steps (step_time_breakdown is null): unavailable.")]
    phases = {}
    for label in study.configurations:
        parts = {phase: 1000 * means.loc[label, column] for phase, column in zip(PHASES, columns)
                 if np.isfinite(means.loc[label, column])}
        rest = 1000 * means.loc[label, step] - sum(parts.values())
        phases[label] = parts | ({"other": rest} if np.isfinite(rest) and rest > 0 else {})
    comm_scale = scale(means[COMM].dropna(), declared.unit(COMM))
    bytes_per_step = ({label: means.loc[label, COMM] / comm_scale.divisor for label in study.configurations
                       if np.isfinite(means.loc[label, COMM])} or None)
    if bytes_per_step and not any(bytes_per_step.values()):
        bytes_per_step = None  # one rank per run: nothing sent, the table says 0
    blocks.append(Image("steps", figures.steps_figure(phases, bytes_per_step, comm_scale.label,
                                                      plots.colours(study.configurations)),
                        "Mean time of a training step per phase (other: the step's time no phase timer covers) "
                        "and the gradient bytes each rank sends per step (0 on one rank: nothing to send)."))
    ms = scale([1000 * v for v in means[[*columns, step]].to_numpy().ravel()], "s")
    rows = [[with_unit(f"{phase}", "ms"), *(ms.text(1000 * means.loc[label, column]) for label in study.configurations)]
            for phase, column in zip([*PHASES, "step"], [*columns, step])]
    rows.append([with_unit(COMM, comm_scale.label), *(comm_scale.text(means.loc[label, COMM])
                                                      for label in study.configurations)])
    return blocks + [Table(["figure (unit)", *study.configurations], rows)]


def residuals_section(study: Study, analysed: dict) -> list:
    """Residuals of each response's fitted model (each configuration's mean: the full factorial model)."""
    from statsmodels.formula.api import ols

    blocks = [Heading("Model checks: residuals")]
    fits = {}
    for response in analysed:
        unit = response_scale(study.table, response)
        y = values(study.table, response) / unit.divisor
        frame = pd.DataFrame({"y": y, "cell": study.labels}).dropna()
        if frame["cell"].value_counts().max() < 2:
            continue
        model = ols("y ~ C(cell)", frame).fit()
        if np.allclose(model.resid, 0):
            continue
        fits[response] = (model.fittedvalues.to_numpy(), model.resid.to_numpy(), unit.label)
    if not fits:
        return blocks + [Text("No response has replicated runs that differ: there are no residuals to check.")]
    return blocks + [Image("residuals", figures.residuals_figure(fits), (
        "Residuals (run minus its configuration's mean, the fitted full factorial model) against fitted values, "
        "and their normal QQ plot: the F tests and intervals assume equal spread and normal errors."))]
