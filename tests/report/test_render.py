"""The whole report from synthetic artifacts: tables, figures, atomic replacement."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image as PILImage

from s4seg.config import ReportConfig
from s4seg.report import ReportInputs, Section, Table, Text, all_sections, build_report
from s4seg.report.base import RegisteredSection
from s4seg.report.render import format_cell, inline_html, to_html, to_markdown


def figure_refs(text: str, pattern: str) -> list[str]:
    return re.findall(pattern, text)


def test_full_report(artifacts, tmp_path):
    out = tmp_path / "reports"
    build_report(artifacts, out, ReportConfig(num_tiles=3))
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    # headline table: warmup / student / gain, tiles and scenes, in percent
    assert "| mIoU (test tiles) | 50.00 | 62.50 | +12.50 |" in md
    assert "| OA (whole test scenes) | 65.00 | 75.00 | +10.00 |" in md
    # per-class IoU: a class absent everywhere is n/a; GT pixel share 300/400
    assert re.search(r"\| tree \| 25\.00 \| 45\.00 \| \+20\.00 \| 25\.00 \|", md)
    assert re.search(r"\| water \| n/a \| n/a \| n/a \| 0\.00 \|", md)
    assert "**62.50** with `fixmatch` against 50.00 for the supervised warmup (**+12.50**)" in md
    assert "Above its warmup (the model it started from) by 12.50 points." in md
    assert "No `supervised` run to compare with at equal iterations" in md
    # the precisions evaluate recorded (a model file written before they were recorded: "unrecorded")
    assert "precision: trained in `warmup` bf16, `student` unrecorded; evaluated in bf16;" in md
    assert "<td>mIoU (test tiles)</td><td>50.00</td><td>62.50</td><td>+12.50</td>" in page
    for section in ("Overview", "Test metrics", "Per-class IoU", "Training curves", "Test tiles", "Parameters"):
        assert f"## {section}" in md and f"<h2>{section}</h2>" in page
    md_figs = figure_refs(md, r"\]\((figures/[\w-]+\.png)\)")
    html_figs = figure_refs(page, r'<img src="(figures/[\w-]+\.png)"')
    assert sorted(md_figs) == sorted(html_figs) == sorted(
        f"figures/{n}.png" for n in ("per_class_iou", "curves_warmup", "curves_train", "predictions"))
    for rel in md_figs:
        with PILImage.open(out / rel) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(Path(p).name for p in md_figs)
    # optional inputs that were given but do not exist are listed, not fatal
    listed = set(re.search(r"Inputs not found \(their sections are left out\): ([\w, ]+)", md)[1].split(", "))
    assert {"dump", "pseudo", "summary"} <= listed and not listed & {"table", "tiles", "predictions", "params"}
    assert "conf_thresh" in md  # the chosen method's params section is shown


def test_report_with_only_params(artifacts, tmp_path):
    out = tmp_path / "reports"
    build_report(ReportInputs(params=artifacts.params), out)
    md = (out / "report.md").read_text()
    assert "## Overview" in md and "## Parameters" in md
    assert "## Test metrics" not in md and "## Test tiles" not in md
    assert list((out / "figures").iterdir()) == []


def test_summary_json_fallback(artifacts, tmp_path):
    (tmp_path / "summary.json").write_text('{"warmup.miou": 0.5, "student.miou": 0.75, "gain.miou": 0.25, '
                                           '"warmup.scene_oa": null}')
    out = tmp_path / "reports"
    build_report(ReportInputs(params=artifacts.params, summary=tmp_path / "summary.json"), out)
    md = (out / "report.md").read_text()
    assert "| mIoU (test tiles) | 50.00 | 75.00 | +25.00 |" in md


def test_failing_section_leaves_previous_report(artifacts, tmp_path):
    out = tmp_path / "reports"
    build_report(artifacts, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(ctx):
        ctx.save_figure(__import__("s4seg.report.figures", fromlist=["x"]).new_figure(1, 1), "half")
        raise RuntimeError("section bug")

    sections = [*all_sections(), RegisteredSection("broken", 99, broken)]
    with pytest.raises(RuntimeError, match="section bug"):
        build_report(artifacts, out, sections=sections)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_markdown_and_html_blocks():
    frame = pd.DataFrame({"a": [1.0, float("nan")], "gain": [0.5, -2.0]}, index=["x|y", "<z>"])
    sections = [Section("S", [Text("use `code` and **bold** <here>"), Table(frame)])]
    md = to_markdown(sections, "T")
    assert "| x\\|y | 1.00 | +0.50 |" in md and "| <z> | n/a | -2.00 |" in md
    page = to_html(sections, "T")
    assert "<code>code</code>" in page and "<strong>bold</strong>" in page and "&lt;here&gt;" in page
    assert "<td>&lt;z&gt;</td>" in page
    assert format_cell(1.234, "gain", "{:.1f}") == "+1.2" and format_cell("s", "a", "{:.2f}") == "s"
    assert inline_html("a < b") == "a &lt; b"


def test_missing_or_empty_training_log_is_reported_not_fatal(artifacts, tmp_path):
    """`dvc repro -f` once left an empty logs/warmup.csv and the report crashed on it."""
    Path(artifacts.warmup_log).write_text("")
    Path(artifacts.train_log).unlink()
    out = tmp_path / "out"
    build_report(artifacts, out)
    md = (out / "report.md").read_text()
    assert f"No curve for warmup (supervised): `{artifacts.warmup_log}` is empty" in md
    assert f"No curve for train (fixmatch): `{artifacts.train_log}` is missing" in md
