"""The report: `reports/report.md`, `reports/report.html` and `reports/figures/*.png`, from artifacts on disk.

The report is a list of sections (`base.register_section`); `render.build_report` runs them in order
and renders Markdown and HTML. Built-in sections live in `sections.py`; any other module of this
package that registers sections is picked up automatically. This package never imports torch.
"""

from s4seg.report.base import (
    Bullets,
    Code,
    Image,
    ReportContext,
    ReportInputs,
    Section,
    Table,
    Text,
    all_sections,
    register_section,
)
from s4seg.report.render import build_report

__all__ = [
    "Bullets",
    "Code",
    "Image",
    "ReportContext",
    "ReportInputs",
    "Section",
    "Table",
    "Text",
    "all_sections",
    "build_report",
    "register_section",
]
