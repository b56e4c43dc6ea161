"""The report as a list of sections: the inputs, the context a section gets, blocks, and the registry.

A section is a small function `ctx -> Section | None`, registered with an order key:

    @register_section("pseudo_quality", order=60)
    def pseudo_quality(ctx: ReportContext) -> Section | None:
        table = ctx.read_parquet("pseudo")       # None when the input is missing: skip the section
        if table is None:
            return None
        fig = new_figure(...); ...
        return Section("Pseudo-label quality", [Text("..."), Table(frame), Image(ctx.save_figure(fig, "pseudo"))])

Any module of the `s4seg.report` package that registers sections is picked up (`all_sections`
imports every module of the package), so a new section needs a new file and nothing else. Built-in
orders: 10 overview, 20 metrics, 30 per-class IoU, 40 training curves, 50 prediction grid, 90 params;
60-80 are free for the dump stage's sections (pseudo-label quality, snapshots).

Sections must tolerate missing optional inputs (return None, or a Text saying what is missing): the
report is rendered from whatever artifacts exist. This package reads files only; it never imports torch.
"""

from __future__ import annotations

import importlib
import json
import logging
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from s4seg.config import ReportConfig

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Inputs and context
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportInputs:
    """Artifact paths (each optional: a missing path or file means the sections that need it are skipped)."""

    params: Path | None = None  # params.yaml
    table: Path | None = None  # metrics/eval.parquet
    summary: Path | None = None  # metrics/summary.json
    warmup_log: Path | None = None  # logs/warmup.csv
    train_log: Path | None = None  # logs/train.csv
    tiles: Path | None = None  # data/tiles.zarr
    split: Path | None = None  # data/split.parquet
    predictions: Path | None = None  # metrics/predictions.zarr
    pseudo: Path | None = None  # metrics/pseudo.parquet
    pseudo_summary: Path | None = None  # metrics/pseudo.json
    pseudo_curve: Path | None = None  # metrics/pseudo_curve.csv
    dump: Path | None = None  # dumps/pseudo.zarr
    snapshots: Path | None = None  # dumps/snapshots.zarr
    baseline: Path | None = None  # report.baseline: a baseline file (s4seg.report.baseline), e.g. supervised


class ReportContext:
    """What a section function gets: the inputs, the report params, cached readers and `save_figure`."""

    def __init__(self, inputs: ReportInputs, config: ReportConfig, figures_dir: Path,
                 figures_prefix: str = "figures") -> None:
        self.inputs = inputs
        self.config = config
        self.figures_dir = Path(figures_dir)
        self.figures_prefix = figures_prefix
        self.missing: set[str] = set()  # names of inputs a section asked for but that do not exist
        self.figures: list[str] = []
        self._cache: dict[str, Any] = {}

    # Paths ---------------------------------------------------------------------------------------
    def path(self, name: str) -> Path | None:
        """The input `name` (a ReportInputs field) if it was given and exists, else None (noted as missing)."""
        if name not in {f.name for f in fields(ReportInputs)}:
            raise KeyError(f"unknown report input {name!r}")
        value = getattr(self.inputs, name)
        if value is None or not Path(value).exists():
            self.missing.add(name)
            return None
        return Path(value)

    # Readers (cached, None when the input is missing) ---------------------------------------------
    def _cached(self, key: str, read: Callable[[Path], Any]) -> Any:
        if key not in self._cache:
            path = self.path(key)
            self._cache[key] = None if path is None else read(path)
        return self._cache[key]

    def read_json(self, name: str) -> dict | None:
        return self._cached(name, lambda p: json.loads(p.read_text()))

    def read_parquet(self, name: str) -> pd.DataFrame | None:
        return self._cached(name, pd.read_parquet)

    def read_csv(self, name: str) -> pd.DataFrame | None:
        def read(p: Path) -> pd.DataFrame | None:
            try:
                frame = pd.read_csv(p)
            except pd.errors.EmptyDataError:  # an empty file: no header, no rows
                return None
            return frame if len(frame) else None

        return self._cached(name, read)

    def open_zarr(self, name: str) -> Any:
        """A read-only zarr group, or None."""
        import zarr

        return self._cached(name, lambda p: zarr.open_group(str(p), mode="r"))

    @cached_property
    def params(self) -> dict[str, Any]:
        """params.yaml as a plain dict ({} if missing): shown as given, not re-validated."""
        path = self.path("params")
        return (yaml.safe_load(path.read_text()) or {}) if path is not None else {}

    @cached_property
    def classes(self) -> list[str]:
        for name in ("predictions", "tiles", "dump"):
            group = self.open_zarr(name)
            if group is not None and "classes" in group.attrs:
                return list(group.attrs["classes"])
        table = self.read_parquet("table")
        if table is not None:
            return [c for c in dict.fromkeys(table["class"]) if c != "all"]
        return []

    @cached_property
    def palette(self) -> list[str]:
        for name in ("predictions", "tiles", "dump"):
            group = self.open_zarr(name)
            if group is not None and "palette" in group.attrs:
                return list(group.attrs["palette"])
        return default_palette(len(self.classes))

    # Figures ---------------------------------------------------------------------------------------
    def save_figure(self, fig: Any, name: str, dpi: int = 100) -> str:
        """Save a matplotlib Figure as `<figures>/<name>.png`; returns the path relative to the report."""
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"figure name {name!r}: use letters, digits, '-' and '_' only")
        if name in self.figures:
            raise ValueError(f"figure name {name!r} used twice")
        self.figures_dir.mkdir(parents=True, exist_ok=True)
        # No "Software" metadata: the same figure gives the same bytes across matplotlib patch releases.
        fig.savefig(self.figures_dir / f"{name}.png", dpi=dpi, metadata={"Software": None}, bbox_inches="tight")
        self.figures.append(name)
        return f"{self.figures_prefix}/{name}.png"


def default_palette(n: int) -> list[str]:
    """Distinct colours when no palette is stored (tab10, then tab20)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [matplotlib.colors.to_hex(cmap(i % cmap.N)) for i in range(n)]


# --------------------------------------------------------------------------------------------------
# Blocks and sections
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Text:
    """A paragraph; `code` and **bold** are kept in Markdown and converted in HTML."""

    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    """A DataFrame shown with its index as the first column. Floats are formatted with `float_format`."""

    frame: pd.DataFrame
    float_format: str = "{:.2f}"
    caption: str = ""


@dataclass(frozen=True)
class Image:
    path: str  # relative to the report, as returned by ReportContext.save_figure
    caption: str = ""


@dataclass(frozen=True)
class Code:
    text: str
    language: str = ""


Block = Text | Bullets | Table | Image | Code


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


SectionFn = Callable[[ReportContext], "Section | None"]


@dataclass(frozen=True)
class RegisteredSection:
    name: str
    order: int
    fn: SectionFn


_SECTIONS: dict[str, RegisteredSection] = {}


def register_section(name: str, order: int) -> Callable[[SectionFn], SectionFn]:
    """Add a section function to the report at position `order` (ascending); see the module docstring."""

    def wrap(fn: SectionFn) -> SectionFn:
        if name in _SECTIONS and _SECTIONS[name].fn.__qualname__ != fn.__qualname__:
            raise RuntimeError(f"report section {name!r} registered twice ({_SECTIONS[name].fn} and {fn})")
        _SECTIONS[name] = RegisteredSection(name, order, fn)
        return fn

    return wrap


def all_sections() -> list[RegisteredSection]:
    """Every registered section, sorted by order, after importing every module of `s4seg.report`."""
    import s4seg.report as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    return sorted(_SECTIONS.values(), key=lambda s: (s.order, s.name))


def finite(value: Any) -> bool:
    return value is not None and isinstance(value, (int, float, np.floating)) and bool(np.isfinite(value))
