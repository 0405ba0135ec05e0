"""The report as a paper needs it, read by its content: units in every header, one row per run with a link to
its folder, F and p per term, a grey marker for a response that barely varies (and no bold for it), bytes in
one unit, tables that fit 1280 px (by estimated width, and measured in headless Chromium where it is
installed), the study file that reads back as the same study, and the environment with commit and CPU model.

One copy of the shared tiny study (conftest's `tiny_study`) with two responses added to its spec: memory as
the issue met it (8.78 to 8.90 %: practically constant) and peak RSS (bytes)."""

from __future__ import annotations

import html as markup
import json
import re
import shutil
import sqlite3
import subprocess
import tomllib

import pytest
from helpers import copy_study, markdown_table, written_report

from distcnn.study.document import MAX_COLUMNS, Table, pieces
from distcnn.study.spec import parse_spec
from distcnn.units import scale

MEMORY = [8.78, 8.80, 8.82, 8.84, 8.86, 8.88, 8.90, 8.85]
WIDTH = 1280
PAGE = WIDTH - 2 * 16  # body padding of 1rem each side
CHAR = 0.85 * 16 * 0.6  # px per character at the tables' .85rem, a generous average glyph
CELL_PADDING = 2 * 0.5 * 16 + 1


@pytest.fixture(scope="module")
def study(tiny_study, tmp_path_factory):
    copy = copy_study(tiny_study, tmp_path_factory.mktemp("paper"))
    with sqlite3.connect(copy / "study.db") as db:
        spec = json.loads(db.execute("SELECT value FROM study WHERE key = 'spec'").fetchone()[0])
        spec["responses"] += ["mem_percent_mean", "rss_peak_bytes"]
        db.execute("UPDATE study SET value = ? WHERE key = 'spec'", (json.dumps(spec),))
        runs = db.execute("SELECT run_id, summary FROM runs WHERE status = 'done' ORDER BY run_id").fetchall()
        for (run_id, summary), memory in zip(runs, MEMORY):
            figures = json.loads(summary) | {"mem_percent_mean": memory}
            db.execute("UPDATE runs SET summary = ? WHERE run_id = ?", (json.dumps(figures), run_id))
    return copy


@pytest.fixture(scope="module")
def paper(study):
    return written_report(study)


def rows_of(markdown: str, heading: str) -> dict[str, list[str]]:
    """A responses-as-rows table: response name -> [its row label, cells...]."""
    _, *rows = markdown_table(markdown, heading)
    return {row[0].split(" (")[0]: row for row in rows}


@pytest.mark.slow
def test_every_response_carries_its_unit_in_the_tables(paper):
    means = rows_of(paper[1], "## Means per configuration")
    assert means["test_accuracy"][0].startswith("test_accuracy (0–1)")
    assert means["cpu_percent_mean"][0].startswith("cpu_percent_mean (%)")
    assert means["train_seconds"][0].startswith("train_seconds (s)")
    assert re.match(r"rss_peak_bytes \((MiB|GiB)\)", means["rss_peak_bytes"][0])  # one unit for the whole row
    header = markdown_table(paper[1], "## Runs")[0]
    assert {"test_accuracy (0–1)", "cpu_percent_mean (%)", "train_seconds (s)", "run time (s)"} <= set(header)
    assert all(re.fullmatch(r"[\d,]+\.\d+ ± [\d,]+\.\d+", cell) for cell in means["rss_peak_bytes"][1:])


@pytest.mark.slow
def test_the_run_table_has_one_row_per_run_linking_its_folder(study, paper):
    with sqlite3.connect(study / "study.db") as db:
        planned = db.execute("SELECT count(*) FROM runs").fetchone()[0]
    _, *rows = markdown_table(paper[1], "## Runs")
    assert len(rows) == planned == 8
    for row in rows:
        link = re.fullmatch(r"\[(c\d\d-r\d)\]\(([^)]+)\)", row[0])
        assert link and not link.group(2).startswith("/")  # relative to the report
        assert (study / link.group(2)).is_dir() and link.group(2).rstrip("/").endswith(link.group(1))
        assert row[3] == "done" and re.fullmatch(r"\d+ / \d+", row[2])
    assert paper[0].count('<a href="') >= 8


@pytest.mark.slow
def test_f_and_p_are_given_per_term(paper):
    header, *rows = markdown_table(paper[1], "### F statistics and p-values")
    assert header[1:] == ["policy: F (p)", "model: F (p)", "policy:model: F (p)"]
    assert len(rows) == 5
    for row in rows:
        for cell in row[1:]:
            found = re.fullmatch(r"([\d.e+-]+) \(p (?:= ([\d.e-]+)|< 0\.001)\)", cell)
            assert found, cell
            assert float(found.group(1)) >= 0 and (found.group(2) is None or 0 <= float(found.group(2)) <= 1)


@pytest.mark.slow
def test_a_practically_constant_response_is_grey_and_never_bold(paper):
    page, markdown = paper
    variation = rows_of(markdown, "## Allocation of variation")
    memory = variation["mem_percent_mean"]
    assert "practically constant" in memory[0] and not any("**" in cell for cell in memory[1:])
    assert re.search(r'<tr class="muted"><th>mem_<wbr>percent_<wbr>mean \(%\) <span class="marker">'
                     r"\(practically constant: CV [\d.]+ %\)</span>", page)
    assert "practically constant" not in variation["test_accuracy"][0]


@pytest.mark.slow
def test_no_table_is_wider_than_the_page(paper):
    for table in re.findall(r"<table>.*?</table>", paper[0], flags=re.S):
        rows = [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row) for row in re.findall(r"<tr.*?</tr>", table)]
        columns = len(rows[0])
        assert columns <= MAX_COLUMNS
        width = 0.0
        for j in range(columns):
            cells = [markup.unescape(re.sub(r"<[^>]+>", "", row[j])) for row in rows]
            # text wraps at spaces (and names after _ and :), figures never: the widest unbreakable piece
            pieces_ = [piece for cell in cells for piece in re.split(r"[\s_:]+", cell)]
            width += max(len(piece) for piece in pieces_) * CHAR + CELL_PADDING
        assert width <= PAGE, table[:200]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed")
def test_nothing_scrolls_sideways_at_1280_px_in_chromium(study, paper, tmp_path):
    probe = tmp_path / "probe.html"
    script = ("<script>const w = Math.max(...[...document.querySelectorAll('table, pre, figure')].map(e => "
              "e.getBoundingClientRect().right)); document.body.setAttribute('data-right', w); "
              "document.body.setAttribute('data-scroll', document.documentElement.scrollWidth);</script>")
    probe.write_text(paper[0].replace("</body>", script + "</body>"), encoding="utf-8")
    result = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                             f"--window-size={WIDTH},900", probe.as_uri()], capture_output=True, text=True,
                            timeout=120)
    right = re.search(r'data-right="([\d.]+)"', result.stdout)
    scroll = re.search(r'data-scroll="(\d+)"', result.stdout)
    assert right and scroll, result.stderr[-500:]
    assert float(right.group(1)) <= WIDTH and int(scroll.group(1)) <= WIDTH


@pytest.mark.slow
def test_the_new_sections_are_there_with_their_plots(study, paper):
    for heading in ("## Runs", "## Model checks: residuals", "## Validation per epoch",
                    "## Step time and communication", "## Study file", "## Environment"):
        assert heading in paper[1]
    for name in ("epochs", "steps", "residuals", "main_effects"):
        assert (study / "report_files" / f"{name}.png").stat().st_size > 5000
    steps = rows_of(paper[1], "## Step time and communication")
    assert {"forward", "backward", "step", "comm_bytes_per_step"} <= set(steps)


@pytest.mark.slow
def test_the_study_file_reads_back_as_the_same_study(study, paper):
    text = re.search(r"```toml\n(.*?)\n```", paper[1], flags=re.S).group(1)
    with sqlite3.connect(study / "study.db") as db:
        spec = json.loads(db.execute("SELECT value FROM study WHERE key = 'spec'").fetchone()[0])
    tomllib.loads(text)
    assert parse_spec(text, "other").as_dict() == spec


@pytest.mark.slow
def test_the_environment_names_the_commit_and_the_cpu(paper):
    rows = dict(markdown_table(paper[1], "## Environment")[1:])
    assert rows["git commit"] and rows["git commit"] != "unavailable"
    assert rows["CPU model"] and {"torch", "python", "statsmodels (analysis)"} <= set(rows)


def test_a_wide_table_is_split_repeating_its_first_column():
    table = Table(["response", *(f"c{i}" for i in range(20))], [["a", *map(str, range(20))]], {(0, 15)})
    split = pieces(table)
    assert len(split) == 3 and all(len(piece.header) <= MAX_COLUMNS and piece.rows[0][0] == "a" for piece in split)
    assert sum(len(piece.header) - 1 for piece in split) == 20
    assert split[2].bold == {(0, 15 - 14)}  # c14 is the first data column of the third piece


def test_bytes_read_in_one_unit_per_column():
    column = scale([900 * 2**20, 3 * 2**20, 1.5 * 2**30], "B")
    assert column.label == "GiB" and [column.text(v) for v in (900 * 2**20, 1.5 * 2**30)] == ["0.879", "1.500"]
    assert scale([512, 1000], "B").label == "B" and scale([], "B").text(None) == "n/a"
