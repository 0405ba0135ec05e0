"""The report's forecast section: what `distcnn study FILE --forecast` predicted for each configuration, beside
what its runs measured, for every response the forecast covers (step time, images/s, training seconds), with
the error of each. Written when STUDY_DIR/forecast.json exists."""

from __future__ import annotations

from distcnn.study.document import Heading, Table, Text
from distcnn.study.forecast import read_forecast
from distcnn.study.report.common import Section, Study, configuration_label

# forecast key -> the run summary's column it is measured by, its label
COVERED = (("step_seconds", "step_seconds_steady", "step (s)"),
           ("images_per_second", "images_per_second", "images/s"),
           ("train_seconds", "train_seconds", "training (s)"))


def applies(study: Study) -> bool:
    return read_forecast(study.directory) is not None


def blocks(study: Study) -> list:
    body, errors = [], {label: [] for _, _, label in COVERED}
    for row in read_forecast(study.directory) or []:
        label = configuration_label(row["levels"], study.factors)
        mine = study.table[study.labels == label]
        if "step_seconds" not in row:
            body.append([label, "-", "-", "-", row.get("note", "-")])
            continue
        for key, column, name in COVERED:
            values = mine[column].dropna().astype(float) if column in mine else []
            measured = float(values.mean()) if len(values) else None
            error = (row[key] - measured) / measured if measured else None
            if error is not None:
                errors[name].append(abs(error))
            body.append([label, name, _number(row[key]), _number(measured),
                         f"{error:+.1%}" if error is not None else "-"])
    summary = "; ".join(f"{name}: median absolute error {sorted(values)[len(values) // 2]:.1%}, worst "
                        f"{max(values):.1%}" for name, values in errors.items() if values)
    return [Heading("Forecast beside measured", 2),
            Text("Each configuration was forecast before the study ran (`distcnn study FILE --forecast`: a short "
                 "one-rank profile, the model of the README's Forecast section); measured is the mean over its "
                 "finished runs (step: the steady-state median step, `step_seconds_steady`). Training seconds "
                 "include the first epoch's warm-up, which the forecast leaves out."
                 + (f" {summary}." if summary else "")),
            Table(["configuration", "figure", "forecast", "measured", "error"], body)]


def _number(value) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"


SECTION = Section("forecast", applies, blocks)
