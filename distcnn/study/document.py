"""A report as a list of blocks (heading, text, table, code, image) rendered to self-contained HTML (images
inline, inline CSS, no scripts, nothing fetched) and to Markdown (images as files beside it): one content, two
forms. A table wider than MAX_COLUMNS is split into several with the same first column, in both forms, so no
table ever scrolls sideways; its figures are right-aligned."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field

FILES = "report_files"  # the Markdown twin's images, beside it
MAX_COLUMNS = 8  # a table's columns, its first (the row names) included: 8 fit 1280 px at the page's font

# ---- blocks -------------------------------------------------------------------------------------------------


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str


@dataclass(frozen=True)
class Link:
    """A table cell that links (relative to the report): a run's folder."""

    text: str
    href: str

    def __str__(self) -> str:
        return self.text


@dataclass
class Table:
    """Rows of cells; the first column names the row (a response, a run). `muted` rows read grey (a response
    that barely varies); `bold` cells are stressed."""

    header: list[str]
    rows: list[list]
    bold: set[tuple[int, int]] = field(default_factory=set)  # (row, column) of cells to stress
    muted: set[int] = field(default_factory=set)  # rows drawn grey


@dataclass
class Code:
    """Text shown verbatim (the study file), in a language for the Markdown fence."""

    text: str
    language: str = ""


@dataclass
class Image:
    name: str  # its file in report_files/: NAME.png
    png: bytes
    caption: str


# ---- tables that fit -----------------------------------------------------------------------------------------

NUMBER = re.compile(r"^(n/a|[−+\-]?[\d.,]+(\s|$|%|[eE][+\-]?\d)|[<>≤≥~]\s?[\d.])")


def right_aligned(table: Table) -> set[int]:
    """The columns (after the first) whose every cell is a figure or n/a: figures line up on the right."""
    columns = set()
    for j in range(1, len(table.header)):
        cells = [str(row[j]) for row in table.rows if j < len(row) and str(row[j])]
        if cells and all(NUMBER.match(cell) for cell in cells):
            columns.add(j)
    return columns


def pieces(table: Table, most: int = MAX_COLUMNS) -> list[Table]:
    """The table as it is, or split by columns into tables of at most `most` columns, each repeating the
    first column (the names of the rows), so a wide table never clips."""
    if len(table.header) <= most:
        return [table]
    split, width = [], most - 1
    for start in range(1, len(table.header), width):
        keep = [0, *range(start, min(start + width, len(table.header)))]
        split.append(Table([table.header[j] for j in keep], [[row[j] for j in keep] for row in table.rows],
                           {(i, keep.index(j)) for i, j in table.bold if j in keep}, table.muted))
    return split


# ---- rendering ----------------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 72rem;
       margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
h1 { border-bottom: 2px solid #ccc; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6rem 0 1.2rem; font-size: .85rem; font-variant-numeric: tabular-nums;
        max-width: 100%; }
th, td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; overflow-wrap: break-word; } tbody th { font-weight: 600; }
td a, th a { white-space: nowrap; }
tr:nth-child(even) td { background: #fafafa; } td.num { text-align: right; } th.num { text-align: right; }
tr.muted td, tr.muted th { color: #999; } .marker { color: #999; font-weight: normal; font-style: italic; }
pre { background: #f6f6f6; border: 1px solid #ddd; padding: .6rem; overflow-wrap: anywhere; white-space: pre-wrap;
      font-size: .85rem; }
figure { margin: 1rem 0; } img { max-width: 100%; height: auto; } figcaption { color: #555; font-size: .9rem; }
"""


def _html_cell(cell, tag: str, strong: bool, number: bool) -> str:
    text = (f'<a href="{html.escape(cell.href)}">{html.escape(cell.text)}</a>' if isinstance(cell, Link)
            else html.escape(str(cell)))
    if tag == "th":  # long names (cpu_percent_mean, policy:model) may wrap after _ and :, never inside a word
        text = re.sub(r"(?<=[_:])(?=\w)", "<wbr>", text) if not isinstance(cell, Link) else text
    text = re.sub(r"\(practically constant[^)]*\)", lambda m: f'<span class="marker">{m.group(0)}</span>', text)
    attributes = ' class="num"' if number else ""
    return f"<{tag}{attributes}>{f'<strong>{text}</strong>' if strong else text}</{tag}>"


def _html_table(table: Table) -> str:
    right = right_aligned(table)
    head = "".join(_html_cell(cell, "th", False, j in right) for j, cell in enumerate(table.header))
    muted = ' class="muted"'
    body = "".join(f"<tr{muted if i in table.muted else ''}>" + "".join(
        _html_cell(cell, "th" if j == 0 else "td", (i, j) in table.bold, j in right) for j, cell in enumerate(row))
        + "</tr>" for i, row in enumerate(table.rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_html(title: str, blocks: list) -> str:
    escape = html.escape
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            parts.append(f"<p>{escape(block.text)}</p>")
        elif isinstance(block, Table):
            parts += [_html_table(piece) for piece in pieces(block)]
        elif isinstance(block, Code):
            parts.append(f"<pre>{escape(block.text)}</pre>")
        else:
            data = base64.b64encode(block.png).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{escape(block.caption)}">'
                         f"<figcaption>{escape(block.caption)}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def markdown_escape(text: str) -> str:
    return re.sub(r"([\\`*_<>|])", r"\\\1", text).replace("\n", " ")


def _markdown_table(table: Table) -> str:
    right = right_aligned(table)

    def cell_text(cell) -> str:
        if isinstance(cell, Link):
            return f"[{markdown_escape(cell.text)}]({cell.href})"
        return markdown_escape(str(cell))

    def line(cells, row=None):
        return "| " + " | ".join(f"**{cell_text(c)}**" if (row, j) in table.bold else cell_text(c)
                                 for j, c in enumerate(cells)) + " |"
    rule = "|" + "".join(" ---: |" if j in right else " --- |" for j in range(len(table.header)))
    return "\n".join([line(table.header), rule, *(line(row, i) for i, row in enumerate(table.rows))])


def to_markdown(blocks: list) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {markdown_escape(block.text)}")
        elif isinstance(block, Text):
            parts.append(markdown_escape(block.text))
        elif isinstance(block, Table):
            parts += [_markdown_table(piece) for piece in pieces(block)]
        elif isinstance(block, Code):
            fence = "````" if "```" in block.text else "```"
            parts.append(f"{fence}{block.language}\n{block.text.rstrip()}\n{fence}")
        else:
            parts.append(f"![{markdown_escape(block.caption)}]({FILES}/{block.name}.png)\n\n"
                         f"*{markdown_escape(block.caption)}*")
    return "\n\n".join(parts) + "\n"
