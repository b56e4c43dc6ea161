"""Render sections to Markdown and HTML, and build the report directory atomically.

    out/report.md, out/report.html   both reference figures as `figures/<name>.png` (relative)
    out/figures/*.png

The figures directory is built in a temporary sibling and renamed into place (`atomic_dir`), then
each text file is written atomically; a section that raises leaves the previous report untouched.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np

from s4seg.config import ReportConfig
from s4seg.io import atomic_dir, write_text_atomic
from s4seg.report.base import (
    Block,
    Bullets,
    Code,
    Image,
    RegisteredSection,
    ReportContext,
    ReportInputs,
    Section,
    Table,
    Text,
    all_sections,
)

log = logging.getLogger(__name__)

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.5; }
h1 { border-bottom: 2px solid #1f77b4; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ddd; padding: .3em .7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f3f6fa; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: .85em; }
.note { color: #777; font-size: .9em; }
"""


# --------------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------------
def format_cell(value: object, column: str, float_format: str) -> str:
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return "n/a"
        return ("{:+" + float_format[2:]).format(value) if column == "gain" else float_format.format(value)
    return str(value)


def table_cells(table: Table) -> tuple[list[str], list[list[str]]]:
    frame = table.frame
    index_name = frame.index.name or ""
    header = [str(index_name), *map(str, frame.columns)]
    rows = [[str(idx), *(format_cell(v, str(c), table.float_format) for c, v in zip(frame.columns, row, strict=True))]
            for idx, row in zip(frame.index, frame.itertuples(index=False), strict=True)]
    return header, rows


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------
def _md_escape_cell(text: str) -> str:
    return text.replace("|", "\\|")


def block_markdown(block: Block) -> str:
    if isinstance(block, Text):
        return block.text
    if isinstance(block, Bullets):
        return "\n".join(f"- {item}" for item in block.items)
    if isinstance(block, Table):
        header, rows = table_cells(block)
        lines = ["| " + " | ".join(map(_md_escape_cell, header)) + " |",
                 "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(map(_md_escape_cell, row)) + " |" for row in rows]
        return ("\n".join(lines) + (f"\n\n*{block.caption}*" if block.caption else ""))
    if isinstance(block, Image):
        return f"![{block.caption}]({block.path})" + (f"\n\n*{block.caption}*" if block.caption else "")
    if isinstance(block, Code):
        return f"```{block.language}\n{block.text}\n```"
    raise TypeError(f"unknown report block {type(block).__name__}")


def to_markdown(sections: Sequence[Section], title: str, notes: Sequence[str] = ()) -> str:
    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"## {section.title}")
        parts += [block_markdown(b) for b in section.blocks]
    parts += [f"*{n}*" for n in notes]
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------
def inline_html(text: str) -> str:
    """Escape, then the two inline marks the sections use: `code` and **bold**."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def block_html(block: Block) -> str:
    if isinstance(block, Text):
        return f"<p>{inline_html(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in block.items) + "</ul>"
    if isinstance(block, Table):
        header, rows = table_cells(block)
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        caption = f"<caption>{inline_html(block.caption)}</caption>" if block.caption else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Image):
        alt = html.escape(block.caption, quote=True)
        caption = f"<figcaption>{inline_html(block.caption)}</figcaption>" if block.caption else ""
        return f'<figure><img src="{html.escape(block.path, quote=True)}" alt="{alt}">{caption}</figure>'
    if isinstance(block, Code):
        return f"<pre><code>{html.escape(block.text)}</code></pre>"
    raise TypeError(f"unknown report block {type(block).__name__}")


def to_html(sections: Sequence[Section], title: str, notes: Sequence[str] = ()) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        body += [block_html(b) for b in section.blocks]
    body += [f'<p class="note">{inline_html(n)}</p>' for n in notes]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------
def build_report(
    inputs: ReportInputs,
    out_dir: str | Path,
    config: ReportConfig | None = None,
    sections: Sequence[RegisteredSection] | None = None,
    title: str = "s4seg report",
) -> list[Section]:
    """Render every registered section (or `sections`) into out_dir/report.md, report.html, figures/."""
    out_dir = Path(out_dir)
    config = config or ReportConfig()
    with atomic_dir(out_dir / "figures") as figures:
        ctx = ReportContext(inputs, config, figures)
        rendered = []
        for registered in sections if sections is not None else all_sections():
            section = registered.fn(ctx)
            if section is None:
                log.info("report: section %r skipped (inputs missing)", registered.name)
            else:
                rendered.append(section)
        # Inputs a section asked for, and inputs given on the command line, that do not exist.
        missing = ctx.missing | {f.name for f in fields(inputs) if getattr(inputs, f.name) is not None
                                 and not Path(getattr(inputs, f.name)).exists()}
        notes = ["Inputs not found (their sections are left out): " + ", ".join(sorted(missing))] if missing else []
        markdown, page = to_markdown(rendered, title, notes), to_html(rendered, title, notes)
    write_text_atomic(out_dir / "report.md", markdown)
    write_text_atomic(out_dir / "report.html", page)
    log.info("report: %d sections, %d figures -> %s", len(rendered), len(ctx.figures), out_dir)
    return rendered

