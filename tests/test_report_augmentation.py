"""What augmentation buys, as the report shows it: a real tiny study (train-subset × aug-strength, replicated,
with a target accuracy and shifted test sets) run through the CLI, then its report read: the accuracy-versus-data,
robustness, over-augmentation and time-to-accuracy sections with their plots and tables."""

from __future__ import annotations

import base64
import json
import re
import sqlite3

import pytest
from helpers import PNG, markdown_table, run_study

from distcnn.study.report import data_needed, thresholds

STUDY = """
[base]
data = "synthetic:n=300"
epochs = 2
batch-size = 32
policy = "paper"
target-accuracy = 0.3
eval-shift = "rotation,noise,occlusion"
shift-images = 40
telemetry = "off"
[factors]
train-subset = [50, 200]
aug-strength = [0.0, 1.0]
[study]
replicates = 2
responses = ["test_accuracy", "time_to_target_seconds", "shift_accuracy_mean", "shift_rotation_accuracy"]
"""
SHIFTS = ["rotation", "noise", "occlusion"]
SECTIONS = {"Time to accuracy": None, "Accuracy versus data": "accuracy_vs_data",
            "Robustness to shifted test sets": "robustness", "Over-augmentation": "augmentation_strength"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """This module's own real study; conftest's `report` fixture writes its report."""
    return run_study(tmp_path_factory.mktemp("augmentation-study"), STUDY)


def summaries(study) -> list[dict]:
    with sqlite3.connect(study / "study.db") as db:
        return [json.loads(row[0]) for row in db.execute("SELECT summary FROM runs WHERE status = 'done'")]


@pytest.mark.slow
def test_every_run_records_shift_accuracy_and_its_training_shifts(study):
    runs = summaries(study)
    assert len(runs) == 8
    for summary in runs:
        assert list(summary["shift_accuracy"]) == SHIFTS
        assert all(list(by) == ["1", "2", "3"] and all(0 <= a <= 1 for a in by.values())
                   for by in summary["shift_accuracy"].values())
        values = [a for by in summary["shift_accuracy"].values() for a in by.values()]
        assert summary["shift_accuracy_mean"] == pytest.approx(sum(values) / len(values))
        trained = ["rotation", "translation", "contrast"] if summary["aug_strength"] == 1.0 else []
        assert summary["shifts_in_training"] == trained
        assert summary["target_accuracy"] == 0.3
        assert summary["shift_images"] == 40 < summary["test_images"]  # a fixed subset of the test set
        assert 0 <= summary["shift_clean_accuracy"] <= 1


@pytest.mark.slow
def test_the_report_has_the_sections_and_their_plots(study, report):
    page, markdown = report
    for heading, image in SECTIONS.items():
        assert f"<h2>{heading}</h2>" in page and f"## {heading}" in markdown
        if image:
            png = (study / "report_files" / f"{image}.png").read_bytes()
            assert png.startswith(PNG) and len(png) > 5000
            assert f"report_files/{image}.png" in markdown
    for data in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page):
        assert base64.b64decode(data).startswith(PNG)


@pytest.mark.slow
def test_images_needed_table_interpolates_or_says_not_reached(report):
    header, *rows = markdown_table(report[1], "## Accuracy versus data")
    assert header[0] == "configuration" and all(h.startswith("images for ") for h in header[1:])
    assert "images for 0.30" in header  # the study's target accuracy is one of the levels
    assert [row[0] for row in rows] == ["aug-strength=0.0", "aug-strength=1.0"]
    for cell in (cell for row in rows for cell in row[1:]):
        assert re.fullmatch(r"not reached|≤ 50 \(reached at the smallest amount\)|≈ [\d,]+ \(interpolated\)|"
                            r"200 \(measured\)", cell), cell


def joined_table(markdown: str, heading: str) -> list[list[str]]:
    """A table the report split by columns to fit the page (document.pieces), joined back: the pieces follow
    each other under `heading`, each repeating the first column."""
    section = markdown.split(heading, 1)[1].split("\n#", 1)[0]
    joined = None
    for chunk in section.split("\n\n"):
        if chunk.startswith("|"):
            table = markdown_table("\n" + chunk, "\n")
            joined = table if joined is None else [row + more[1:] for row, more in zip(joined, table)]
    return joined


@pytest.mark.slow
def test_robustness_table_keeps_in_training_shifts_apart(report):
    header, *rows = joined_table(report[1], "## Robustness to shifted test sets")
    assert header == ["configuration", "unshifted accuracy", *SHIFTS, "in training (mean)", "not in training (mean)",
                      "the same shifts, unaugmented runs", "shift_accuracy_mean"]
    assert len(rows) == 4
    def subset(label: str) -> str:
        return dict(part.split("=") for part in label.split(", "))["train-subset"]

    unaugmented = {subset(row[0]): row for row in rows if "aug-strength=0.0" in row[0]}
    for row in rows:
        trained = "aug-strength=1.0" in row[0]
        assert row[2].endswith("†") == trained  # paper rotates: rotation is in its training distribution
        assert not row[3].endswith("†") and not row[4].endswith("†")  # nothing in paper adds noise or occludes
        assert (row[5] == "none") == (not trained)
        others = [float(cell) for cell in row[3 if trained else 2 : 5]]  # the shifts not in training
        assert float(row[6]) == pytest.approx(sum(others) / len(others), abs=2e-4)
        if trained:
            assert float(row[5]) == pytest.approx(float(row[2].rstrip(" †")), abs=1e-4)
        # the reference: the unaugmented runs of the same train-subset, over the same (noise, occlusion) shifts
        reference = unaugmented[subset(row[0])]
        expected = [float(reference[i]) for i in (3, 4)] if trained else [float(reference[i]) for i in (2, 3, 4)]
        assert float(row[7]) == pytest.approx(sum(expected) / len(expected), abs=2e-4)


@pytest.mark.slow
def test_over_augmentation_and_time_to_accuracy_tables(report):
    header, *rows = markdown_table(report[1], "## Over-augmentation")
    assert header[:2] == ["configuration", "best strength"]
    assert [row[0] for row in rows] == ["train-subset=50", "train-subset=200"]
    assert all(row[1] in ("0", "1") for row in rows)
    header, *rows = markdown_table(report[1], "## Time to accuracy")
    assert header == ["configuration", "target", "reached", "seconds", "epochs", "images"]
    assert len(rows) == 4 and all(row[1] == "0.3" and re.fullmatch(r"[0-2] of 2", row[2]) for row in rows)
    assert all((row[3] == "not reached") == row[2].startswith("0 ") for row in rows)


def test_data_needed_interpolates_in_log_images():
    assert data_needed([100, 1000], [0.6, 0.8], 0.7) == "≈ 316 (interpolated)"  # halfway in log: sqrt(100 × 1000)
    assert data_needed([100, 1000], [0.6, 0.8], 0.5) == "≤ 100 (reached at the smallest amount)"
    assert data_needed([100, 1000], [0.6, 0.8], 0.8) == "1,000 (measured)"
    assert data_needed([100, 1000], [0.6, 0.8], 0.9) == "not reached"
    assert data_needed([100, 300, 1000], [0.6, 0.9, 0.7], 0.85) .startswith("≈ ")  # the first crossing


def test_thresholds_are_round_accuracies_inside_the_measured_range():
    assert thresholds([0.62, 0.91], None) == [0.65, 0.75, 0.8, 0.9]
    assert thresholds([0.62, 0.91], 0.85) == [0.65, 0.75, 0.8, 0.85, 0.9]
    assert thresholds([0.612, 0.634], None) == [0.62, 0.63]
