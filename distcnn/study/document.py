"""A report as a list of blocks (heading, text, table, image) rendered to self-contained HTML (images inline,
inline CSS, no scripts, nothing fetched) and to Markdown (images as files beside it): one content, two forms."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field

FILES = "report_files"  # the Markdown twin's images, beside it

# ---- blocks -------------------------------------------------------------------------------------------------

@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)  # (row, column) of cells to stress


@dataclass
class Image:
    name: str  # its file in report_files/: NAME.png
    png: bytes
    caption: str


# ---- rendering ----------------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 72rem;
       margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
h1 { border-bottom: 2px solid #ccc; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6rem 0 1.2rem; font-size: .85rem; font-variant-numeric: tabular-nums;
        display: block; max-width: 100%; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1rem 0; } img { max-width: 100%; } figcaption { color: #555; font-size: .9rem; }
"""


def to_html(title: str, blocks: list) -> str:
    escape = html.escape
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            parts.append(f"<p>{escape(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{escape(cell)}</th>" for cell in block.header)
            body = "".join("<tr>" + "".join(
                f"<td><strong>{escape(cell)}</strong></td>" if (i, j) in block.bold else f"<td>{escape(cell)}</td>"
                for j, cell in enumerate(row)) + "</tr>" for i, row in enumerate(block.rows))
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            data = base64.b64encode(block.png).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{escape(block.caption)}">'
                         f"<figcaption>{escape(block.caption)}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def markdown_escape(text: str) -> str:
    return re.sub(r"([\\`*_<>|])", r"\\\1", text).replace("\n", " ")


def to_markdown(blocks: list) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {markdown_escape(block.text)}")
        elif isinstance(block, Text):
            parts.append(markdown_escape(block.text))
        elif isinstance(block, Table):
            def line(cells, row=None):
                return "| " + " | ".join(f"**{markdown_escape(c)}**" if (row, j) in block.bold else markdown_escape(c)
                                         for j, c in enumerate(cells)) + " |"
            parts.append("\n".join([line(block.header), "|" + " --- |" * len(block.header),
                                    *(line(row, i) for i, row in enumerate(block.rows))]))
        else:
            parts.append(f"![{markdown_escape(block.caption)}]({FILES}/{block.name}.png)\n\n"
                         f"*{markdown_escape(block.caption)}*")
    return "\n\n".join(parts) + "\n"

