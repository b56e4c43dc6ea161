"""The dump stage's report sections on hand-made artifacts: numbers digit by digit, missing inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from s4seg.data.store import TileStore, TileStoreWriter
from s4seg.evaluation.snapshots import SnapshotWriter
from s4seg.report import ReportInputs
from s4seg.report.base import all_sections
from s4seg.report.pseudo_section import pseudo_section


def _table(path: Path) -> Path:
    rows = []
    values = {"warmup": {"accuracy": 0.8, "coverage": 0.5, "regions": 40.0},
              "student": {"accuracy": 0.9, "coverage": 0.625, "regions": 30.0}}
    for model, metrics in values.items():
        for metric, value in metrics.items():
            rows.append({"model": model, "class": "all", "metric": metric, "value": value})
            for c, name in enumerate(("road", "tree")):
                rows.append({"model": model, "class": name, "metric": metric, "value": value * (c + 1) / 2})
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_quality_table_from_parquet_with_gain(tmp_path: Path) -> None:
    markdown, figures = pseudo_section(ReportInputs(pseudo=_table(tmp_path / "p.parquet")), tmp_path / "fig")
    assert "| accuracy of selected | 80.0 | 90.0 | +10.0 |" in markdown
    assert "| coverage | 50.0 | 62.5 | +12.5 |" in markdown
    assert "| regions | 40 | 30 | -10 |" in markdown
    assert [p.name for p in figures] == ["pseudo_per_class.png"] and figures[0].is_file()
    assert "during training" not in markdown  # no snapshots given


def test_class_mix_gap_in_the_table_kept_share_in_the_figure_only(tmp_path: Path) -> None:
    rows = [{"model": "student", "class": c, "metric": m, "value": v}
            for c, m, v in [("all", "kept_share", 1.0), ("all", "class_bias", 0.25), ("road", "kept_share", 0.75),
                            ("tree", "kept_share", 0.25), ("road", "class_bias", 0.25), ("tree", "class_bias", -0.25),
                            ("all", "coverage", 0.5), ("road", "coverage", 0.5), ("tree", "coverage", 0.5)]]
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    markdown, figures = pseudo_section(ReportInputs(pseudo=tmp_path / "p.parquet"), tmp_path / "fig")
    assert "| class mix gap (kept vs ground truth) | 25.0 |" in markdown
    assert "share of the kept pixels" not in markdown  # 100 % overall by definition: per class only
    assert [p.name for p in figures] == ["pseudo_per_class.png"] and figures[0].is_file()
    # a table with one per-class metric gets a one-panel figure
    pd.DataFrame([r for r in rows if r["metric"] == "coverage"]).to_parquet(tmp_path / "one.parquet")
    _, figures = pseudo_section(ReportInputs(pseudo=tmp_path / "one.parquet"), tmp_path / "fig1")
    assert [p.name for p in figures] == ["pseudo_per_class.png"]


def test_propagation_rows_only_where_a_model_has_them(tmp_path: Path) -> None:
    nan = float("nan")
    student = {"coverage": 0.5, "propagated_coverage": 0.02, "propagated_accuracy": 0.7, "region_accuracy": nan}
    warmup = {"coverage": 0.25, "propagated_coverage": nan, "propagated_accuracy": nan, "region_accuracy": nan}
    rows = [{"model": model, "class": "all", "metric": metric, "value": value}
            for model, values in (("student", student), ("warmup", warmup)) for metric, value in values.items()]
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    markdown, _ = pseudo_section(ReportInputs(pseudo=tmp_path / "p.parquet"), tmp_path / "fig")
    assert "| coverage added by propagation | n/a | 2.0 | n/a |" in markdown
    assert "| accuracy of what propagation added | n/a | 70.0 | n/a |" in markdown
    assert "| region accuracy |" not in markdown  # no model has it: no row of n/a


def test_quality_table_from_json_only(tmp_path: Path) -> None:
    flat = {"student.accuracy": 0.75, "warmup.accuracy": 0.5, "gain.accuracy": 0.25, "student.coverage": None,
            "warmup.coverage": 0.5}
    (tmp_path / "p.json").write_text(json.dumps(flat))
    markdown, figures = pseudo_section(ReportInputs(pseudo_summary=tmp_path / "p.json"), tmp_path / "fig")
    assert "| accuracy of selected | 50.0 | 75.0 | +25.0 |" in markdown
    assert "| coverage | 50.0 | n/a | n/a |" in markdown
    assert figures == []


def test_nothing_given_renders_nothing(tmp_path: Path) -> None:
    assert pseudo_section(ReportInputs(), tmp_path / "fig") == ("\n", [])


def test_empty_snapshots_say_how_to_enable_them(tmp_path: Path) -> None:
    w = TileStoreWriter(tmp_path / "t.zarr", dataset="d", classes=["a"], palette=["#ff0000"], tile_size=4, stride=4)
    w.add_scene("s", np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 4, 4), np.uint8), np.zeros((1, 2)), 4, 4)
    w.close()
    SnapshotWriter(tmp_path / "s.zarr", TileStore(tmp_path / "t.zarr"), []).close()
    markdown, _ = pseudo_section(ReportInputs(snapshots=tmp_path / "s.zarr"), tmp_path / "fig")
    assert "No snapshots were taken (`train.snapshot_every` is 0)" in markdown


def test_sections_are_registered_between_builtins() -> None:
    orders = {s.name: s.order for s in all_sections()}
    assert orders["pseudo_quality"] == 60 and orders["pseudo_snapshots"] == 70
