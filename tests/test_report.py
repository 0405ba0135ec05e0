"""The study report: the shared real tiny 2^2 2 study (the `tiny_study` fixture), then its report read the way a
person would: every section there, every plot inline, the Markdown's images on disk, the shares adding up."""

from __future__ import annotations

import base64
import json
import re
import shutil
import sqlite3

import pytest
from helpers import PNG, cli, copy_study, markdown_table

from distcnn.errors import UsageError
from distcnn.study.report import configuration_label, write_report

FACTORS = {"policy": ["none", "flip-crop"], "model": ["lenet", "simplecnn"]}
RESPONSES = ["test_accuracy", "cpu_percent_mean", "train_seconds"]
SECTIONS = ["means", "allocation of variation", "main effects", "interactions", "resources", "pareto", "environment"]


@pytest.fixture(scope="module")
def study(tiny_study, tmp_path_factory):
    """A copy of the shared study for the report (conftest's `report` fixture) to be written into."""
    return copy_study(tiny_study, tmp_path_factory.mktemp("report"))


def configuration_labels() -> list[str]:
    return [configuration_label({"policy": policy, "model": model}, list(FACTORS))
            for policy in FACTORS["policy"] for model in FACTORS["model"]]


@pytest.mark.slow
def test_both_files_are_written_where_promised(study, report):
    assert (study / "report.html").is_file() and (study / "report.md").is_file()
    assert not list(study.glob(".report*")) and not list((study / "report_files").glob(".*"))  # no temp files left


@pytest.mark.slow
def test_html_has_every_section_configuration_and_response(report):
    page = report[0].lower()
    for section in SECTIONS:
        assert re.search(rf"<h[1-3]>[^<]*{section}", page), section
    for label in configuration_labels():
        assert label.lower() in page
    for response in RESPONSES:
        assert response in page


@pytest.mark.slow
def test_html_is_self_contained_with_real_inline_plots(report):
    page = report[0]
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 4
    for data in images:
        png = base64.b64decode(data)
        assert png.startswith(PNG) and len(png) > 5000
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert len(re.findall("<img", page)) == len(images)  # no image from anywhere else


@pytest.mark.slow
def test_markdown_links_only_plots_that_exist(study, report):
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report[1])
    assert len(links) >= 4
    for link in links:
        assert link.startswith("report_files/") and (study / link).read_bytes().startswith(PNG)
    assert "data:image" not in report[1]


@pytest.mark.slow
def test_allocation_of_variation_adds_up_to_100_and_marks_the_largest(report):
    header, *rows = markdown_table(report[1], "## Allocation of variation")
    assert header == ["response", "policy (%)", "model (%)", "policy:model (%)", "error (%)"]
    assert [row[0].split(" (")[0] for row in rows] == RESPONSES  # responses as rows, each with its unit
    for row, response in zip(rows, RESPONSES):
        cells = row[1:]
        if response != "test_accuracy" and set(cells) == {"n/a"}:
            assert f"{response}: every run measured the same value" in report[1].replace("\\", "")
            continue  # a saturated CPU reads 100 % in every run: no variation to share out
        assert sum(float(cell.strip("*")) for cell in cells) == pytest.approx(100, abs=0.3)
        if "practically constant" in row[0]:
            assert not any(cell.startswith("**") for cell in cells)  # a noise-sized share is never stressed
            continue
        largest = max(cells, key=lambda cell: float(cell.strip("*")))
        assert largest.startswith("**") and sum(cell.startswith("**") for cell in cells) == cells.count(largest)


@pytest.mark.slow
def test_means_table_has_a_column_per_configuration(report):
    header, runs, *rows = markdown_table(report[1], "## Means per configuration")
    assert header == ["response (unit)", *configuration_labels()]
    assert runs == ["runs", "2", "2", "2", "2"]
    assert [row[0].split(" (")[0] for row in rows] == RESPONSES
    accuracy = rows[0]
    assert accuracy[0].startswith("test_accuracy (0–1)")
    assert all(re.fullmatch(r"0\.\d{4} ± \d\.\d{4}", cell) for cell in accuracy[1:])  # accuracies to 4 decimals


@pytest.mark.slow
def test_failed_runs_and_responses_without_numbers_are_reported_not_fatal(study, tmp_path):
    copy = copy_study(study, tmp_path)
    with sqlite3.connect(copy / "study.db") as db:
        db.execute("UPDATE runs SET status = 'failed', error = '<b>boom</b> & out of memory' WHERE run_id = 'c00-r1'")
        spec = json.loads(db.execute("SELECT value FROM study WHERE key = 'spec'").fetchone()[0])
        spec["responses"].append("ddp_comm_seconds_mean")  # None on one process: no number to analyse
        db.execute("UPDATE study SET value = ? WHERE key = 'spec'", (json.dumps(spec),))
    page = write_report(copy)[0].read_text(encoding="utf-8")
    assert "Failed runs" in page and "&lt;b&gt;boom&lt;/b&gt; &amp; out of memory" in page and "<b>boom" not in page
    assert "ddp_comm_seconds_mean: skipped" in page
    assert "7 done, 1 failed" in page


def test_a_directory_without_study_db_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="study.db"):
        write_report(tmp_path)


@pytest.mark.slow
def test_a_study_without_finished_runs_is_a_usage_error(study, tmp_path):
    copy = tmp_path / "pending"
    copy.mkdir()
    shutil.copy(study / "study.db", copy / "study.db")
    with sqlite3.connect(copy / "study.db") as db:
        db.execute("UPDATE runs SET status = 'pending', summary = NULL")
    with pytest.raises(UsageError, match="no finished run in .* yet"):
        write_report(copy)


@pytest.mark.slow
def test_the_cli_writes_the_report(study, capsys):
    code, stdout, stderr = cli(capsys, "report", study)
    assert code == 0, stderr
    assert str(study / "report.html") in stdout and str(study / "report.md") in stdout


@pytest.mark.slow
def test_sections_for_factors_the_study_lacks_are_left_out(report):
    page = report[0]
    for heading in ("Accuracy versus data", "Robustness to shifted test sets", "Over-augmentation",
                    "Time to accuracy"):
        assert heading not in page
