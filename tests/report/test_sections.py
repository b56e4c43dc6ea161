"""Built-in sections in isolation: tile picking, log column grouping, missing inputs."""

from __future__ import annotations

import numpy as np
import pytest

from s4seg.config import ReportConfig
from s4seg.report import ReportContext, ReportInputs, all_sections
from s4seg.report.sections import _column_groups, curves, metrics, pick_tiles, predictions


def test_pick_tiles_spread_evenly():
    np.testing.assert_array_equal(pick_tiles(np.arange(10, 20), 3), [0, 4, 9])
    np.testing.assert_array_equal(pick_tiles(np.arange(2), 6), [0, 1])
    assert len(pick_tiles(np.arange(5), 0)) == 0 and len(pick_tiles(np.zeros(0), 3)) == 0


def test_log_columns_grouped_by_name():
    groups = _column_groups(["loss", "loss_u_s1", "lr", "lr_head", "pseudo_acc", "keep_ratio", "epoch", "time"])
    assert groups == {"loss": ["loss", "loss_u_s1"], "learning rate": ["lr", "lr_head"],
                      "pseudo-labels": ["pseudo_acc", "keep_ratio"]}


def test_sections_skip_missing_inputs(tmp_path):
    ctx = ReportContext(ReportInputs(table=tmp_path / "nope.parquet"), ReportConfig(), tmp_path / "figs")
    assert metrics(ctx) is None and curves(ctx) is None and predictions(ctx) is None
    assert ctx.missing == {"params", "table", "summary", "warmup_log", "train_log", "predictions", "tiles"}


def test_context_palette_and_classes_from_artifacts(artifacts, tmp_path):
    ctx = ReportContext(artifacts, ReportConfig(), tmp_path / "figs")
    assert ctx.classes == ["road", "tree", "water"] and ctx.palette[1] == "#00a000"
    with pytest.raises(KeyError, match="unknown report input 'nope'"):
        ctx.path("nope")


def test_save_figure_names(artifacts, tmp_path):
    from s4seg.report.figures import new_figure

    ctx = ReportContext(artifacts, ReportConfig(), tmp_path / "figs")
    assert ctx.save_figure(new_figure(1, 1), "a_b-1") == "figures/a_b-1.png"
    assert (tmp_path / "figs" / "a_b-1.png").is_file()
    with pytest.raises(ValueError, match="used twice"):
        ctx.save_figure(new_figure(1, 1), "a_b-1")
    with pytest.raises(ValueError, match="letters, digits"):
        ctx.save_figure(new_figure(1, 1), "../x")


def test_registry_order():
    names = [s.name for s in all_sections()]
    builtin = ["overview", "metrics", "per_class_iou", "curves", "predictions", "params"]
    assert [n for n in names if n in builtin] == builtin
