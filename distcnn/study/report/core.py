"""`distcnn report STUDY_DIR`: one page that answers the study — which factor moves which response, at what
cost — as STUDY_DIR/report.html (self-contained: plots inline, no network, no scripts) and its Markdown twin
STUDY_DIR/report.md (plots in report_files/). Both are rendered from the same blocks, so they cannot disagree.

Reads only study.db and the run records; a study still running or with failed runs gets a report of what is
done, and a response without numbers (a counter this machine lacks) is named and skipped, never plotted as 0.
The generic factorial report is here; the sections only some studies call for (what augmentation buys) are
OPTIONAL, each written when it applies to the study.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import pandas as pd

from distcnn import summary as declared
from distcnn.errors import UsageError
from distcnn.record import read_series, write_atomic
from distcnn.study import plots
from distcnn.study.analysis import analyse_responses
from distcnn.study.document import FILES, Heading, Image, Table, Text, to_html, to_markdown
from distcnn.study.report import augmentation, forecast, provenance, runs, tables
from distcnn.study.report.common import (ACCURACY, ALPHA, Section, Study, configuration_label, load_study, numeric,
                                         practically_constant, response_label, response_scale)
from distcnn.study.store import DATABASE, option_name
from distcnn.units import duration

HTML_NAME, MARKDOWN_NAME = "report.html", "report.md"
# the first cost, and the first other one present
COSTS = tuple(declared.key(name) for name in ("train_seconds", "cpu_seconds_total", "net_bytes_total"))
OPTIONAL: tuple[Section, ...] = (*augmentation.SECTIONS, forecast.SECTION)  # after the Pareto section, in order


def analyse(study: Study) -> tuple[dict[str, dict], list[str]]:
    """Each response's analysis (response by response, so one without numbers is skipped, not fatal), and
    a line for each one skipped."""
    analyses = analyse_responses(study.table, study.factors, study.spec.get("responses", []), study.level_order,
                                 ALPHA)
    analysed, skipped = {}, []
    for response in study.spec.get("responses", []):
        if response in analyses.missing:
            skipped.append(f"{response}: skipped, a number in {analyses.missing[response]} of {analyses.runs} "
                           f"runs (unavailable on this machine, or too few runs done)")
        elif response in analyses.failed:
            skipped.append(f"{response}: not analysed: {analyses.failed[response]}")
        else:
            result = analyses.results[response]
            analysed[response] = {"design": result["design"], "replicates": result["replicates"],
                                  "note": result.get("note")} | result["responses"][response]
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


def effect_plots(study: Study, analysed: dict) -> list:
    if not analysed:
        return []
    scales = {name: (scale.label, scale.divisor) for name in analysed
              for scale in [response_scale(study.table, name)]}
    constant = {name for name in analysed if practically_constant(study.table, name)}
    arguments = (study.table, study.factors, study.level_order, list(analysed), ALPHA, scales, constant)
    blocks = [Heading("Main effects"), Image("main_effects", plots.main_effects_figure(*arguments),
                                               "Mean response at each level of each factor, in its unit, with "
                                               "confidence intervals from the pooled replicate error; each y-axis "
                                               f"spans at least ±{100 * plots.ANCHOR:g}% of the grand mean (dotted; "
                                               "right-hand axis: % from it), so a tiny wobble is drawn flat; grey: "
                                               "practically constant.")]
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


def pareto_section(study: Study) -> list:
    blocks = [Heading("Accuracy versus cost (Pareto)")]
    costs = [cost for cost in COSTS if numeric(study.table, cost)]
    if not numeric(study.table, ACCURACY) or not costs:
        return blocks + [Text(f"No {ACCURACY} or cost figures recorded: nothing to compare.")]
    costs = costs[:2]
    scales = {name: response_scale(study.table, name) for name in (ACCURACY, *costs)}
    table = study.table.assign(**{name: pd.to_numeric(study.table[name], errors="coerce") / scales[name].divisor
                                  for name in (ACCURACY, *costs)})  # in the unit the axes and table say
    blocks.append(Image("pareto", plots.pareto_figure(table, study.labels, plots.colours(study.configurations),
                                                      costs, ACCURACY, {name: response_label(study.table, name)
                                                                        for name in (ACCURACY, *costs)}),
                        f"{ACCURACY} against cost; the dashed step line joins the configuration means that no "
                        f"other configuration beats on both cost and accuracy."))
    means = table.groupby(study.labels)[[ACCURACY, *costs]].mean()
    fronts = [{label for *_, label in plots.pareto_front(
        [(x, y, label) for label, (x, y) in means[[cost, ACCURACY]].dropna().iterrows()])} for cost in costs]
    rows = [[label, *(replace(scales[name], divisor=1.0).text(means.loc[label, name]) for name in (ACCURACY, *costs)),
             *("✓" if label in front else "" for front in fronts)] for label in study.configurations]
    return blocks + [Table(["configuration", *(f"mean {response_label(study.table, name)}"
                                               for name in (ACCURACY, *costs)),
                            *(f"on the front by {cost}" for cost in costs)], rows)]


def failed_section(study: Study) -> list:
    failed = [run for run in study.runs if run["status"] == "failed"]
    if not failed:
        return []
    rows = [[run["run_id"], configuration_label({option_name(k): v for k, v in run["levels"].items()}, study.factors),
             str(run["attempts"]), run["error"] or ""] for run in failed]
    return [Heading("Failed runs"), Table(["run", "configuration", "attempts", "error"], rows)]


# ---- the report --------------------------------------------------------------------------------------------

def report_blocks(study: Study) -> list:
    analysed, skipped = analyse(study)
    return [*overview(study), *runs.runs_section(study), *tables.means_section(study, analysed),
            *tables.variation_section(study, analysed, skipped), *effect_plots(study, analysed),
            *runs.residuals_section(study, analysed), *runs.epochs_section(study), *runs.steps_section(study),
            *resources_section(study), *pareto_section(study),
            *(block for section in OPTIONAL if section.applies(study) for block in section.blocks(study)),
            *failed_section(study), *provenance.study_file_section(study), *provenance.environment_section(study)]


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
