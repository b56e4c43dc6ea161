"""Baselines (`s4seg baseline`, `report.baseline`): the file, the protocol check, and the report's headline."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import yaml

from s4seg.config import ReportConfig
from s4seg.errors import ParamsError
from s4seg.report import ReportContext, build_report
from s4seg.report.baseline import last_step, protocol_differences, read_baseline, save_baseline
from s4seg.report.sections import overview

REPO = Path(__file__).resolve().parents[2]
RUN_PARAMS = {"seed": 0, "method": "fixmatch", "dataset": {"name": "synthetic"},
              "model": {"encoder": "resnet18"}, "warmup": {"iterations": 200},
              "train": {"init": "warmup", "iterations": 10, "lr": 0.005, "device": "auto", "log_every": 5}}


def write_baseline(root: Path, miou: float, *, params: dict | None = None, steps: int = 10,
                   method: str = "supervised") -> Path:
    """A supervised run's workspace (params, summary, train log) saved with save_baseline."""
    run = root / f"baseline_run_{method}"
    run.mkdir(exist_ok=True)
    (run / "params.yaml").write_text(yaml.safe_dump({**(params or RUN_PARAMS), "method": method}))
    (run / "summary.json").write_text(json.dumps({"warmup.miou": 0.5, "student.miou": miou,
                                                  "student.scene_miou": miou - 0.1, "gain.miou": miou - 0.5}))
    pd.DataFrame({"step": list(range(5, steps + 1, 5)) or [steps], "loss": 1.0}).to_csv(run / "train.csv",
                                                                                          index=False)
    return save_baseline(run / "summary.json", run / "params.yaml", run / "train.csv", root / f"{method}.json")


def run_inputs(artifacts, tmp_path: Path, baseline: Path | None, params: dict | None = None):
    """The conftest artifacts (warmup 50.00, student 62.50 test-tile mIoU) with this run's params and baseline."""
    (tmp_path / "run_params.yaml").write_text(yaml.safe_dump(params or RUN_PARAMS))
    return replace(artifacts, params=tmp_path / "run_params.yaml", baseline=baseline)


def headline_items(inputs, tmp_path: Path) -> list[str]:
    return list(overview(ReportContext(inputs, ReportConfig(), tmp_path / "figs")).blocks[0].items)


def test_baseline_file_round_trip(tmp_path):
    path = write_baseline(tmp_path, 0.6)
    baseline = read_baseline(path)
    assert baseline.method == "supervised" and baseline.steps == 10
    assert baseline.value("miou") == 0.6 and baseline.value("scene_miou") == pytest.approx(0.5)
    assert baseline.params["train"]["iterations"] == 10 and "method" not in baseline.params
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ParamsError, match="not an s4seg baseline"):
        read_baseline(tmp_path / "bad.json")
    assert last_step(tmp_path / "missing.csv") is None


def test_protocol_differences(tmp_path):
    baseline = read_baseline(write_baseline(tmp_path, 0.6))
    assert protocol_differences(baseline, RUN_PARAMS, steps=10) == []
    # where it runs and how it is logged do not matter; a missing train.init is the warm start
    same = {**RUN_PARAMS, "train": {**RUN_PARAMS["train"], "device": "cpu", "log_every": 1}}
    same["train"].pop("init")
    assert protocol_differences(baseline, same, steps=None) == []
    other = {**RUN_PARAMS, "seed": 1, "train": {**RUN_PARAMS["train"], "iterations": 20}}
    assert protocol_differences(baseline, other, steps=20) == ["iterations: 10 vs 20", "seed: 0 vs 1",
                                                               "train.iterations: 10 vs 20"]
    # the warmup counts only when a run starts from it
    pretrained = {**RUN_PARAMS, "train": {**RUN_PARAMS["train"], "init": "pretrained"}}
    base_pre = read_baseline(write_baseline(tmp_path, 0.6, params=pretrained))
    assert protocol_differences(base_pre, {**pretrained, "warmup": {"iterations": 5}}, steps=10) == []
    assert protocol_differences(baseline, {**RUN_PARAMS, "warmup": {"iterations": 5}}, steps=10) == [
        "warmup.iterations: 200 vs 5"]


def test_headline_without_baseline_says_what_is_missing(artifacts, tmp_path):
    items = headline_items(run_inputs(artifacts, tmp_path, None), tmp_path)
    assert "test-tile mIoU: **62.50** with `fixmatch` against 50.00 for the supervised warmup (**+12.50**)" in items
    assert "Above its warmup (the model it started from) by 12.50 points." in items
    assert any(i.startswith("No `supervised` run to compare with at equal iterations") for i in items)
    assert not any("Below" in i for i in items)


def test_headline_below_supervised_at_equal_iterations(artifacts, tmp_path):
    path = write_baseline(tmp_path, 0.66)  # supervised 66.00 > fixmatch 62.50
    items = headline_items(run_inputs(artifacts, tmp_path, path), tmp_path)
    assert f"for `supervised` (**-3.50**, `{path}`)" in items[3]
    assert ("**Below `supervised`**: `fixmatch` scores 3.50 points less test-tile mIoU than `supervised` at equal "
            "iterations (10 steps) on the same data, split, seed, model and schedule: at this budget the unlabeled "
            "data cost more than it bought.") in items
    assert not any(i.startswith("No `supervised`") for i in items)


def test_headline_above_supervised_and_unequal_settings(artifacts, tmp_path):
    path = write_baseline(tmp_path, 0.6, params={**RUN_PARAMS, "seed": 3}, steps=20)
    items = headline_items(run_inputs(artifacts, tmp_path, path), tmp_path)
    assert ("Above `supervised` by 2.50 points (**not at equal settings**: baseline vs this run, iterations: 20 vs "
            "10; seed: 3 vs 0).") in items


def test_headline_below_warmup(artifacts, tmp_path):
    table = pd.read_parquet(artifacts.table)
    table.loc[(table["model"] == "student") & (table["metric"] == "miou"), "value"] = 0.45
    table.to_parquet(tmp_path / "eval_low.parquet")
    inputs = replace(run_inputs(artifacts, tmp_path, None), table=tmp_path / "eval_low.parquet")
    items = headline_items(inputs, tmp_path)
    assert ("**Below its warmup (the model it started from)**: `fixmatch` scores 5.00 points less test-tile mIoU: "
            "training on the unlabeled tiles undid part of what the warmup had learned at this budget.") in items
    pretrained = {**RUN_PARAMS, "train": {**RUN_PARAMS["train"], "init": "pretrained"}}
    items = headline_items(replace(run_inputs(artifacts, tmp_path, None, pretrained), table=inputs.table), tmp_path)
    assert items[0].startswith("method: `fixmatch`, trained from the pretrained encoder")
    assert ("**Below the warmup (the labeled-only reference; this run did not start from it)**: `fixmatch` scores "
            "5.00 points less test-tile mIoU.") in items


def test_metrics_table_shows_the_baseline_column(artifacts, tmp_path):
    path = write_baseline(tmp_path, 0.66)
    build_report(run_inputs(artifacts, tmp_path, path), tmp_path / "out", ReportConfig(num_tiles=0))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "|  | warmup | student | supervised (baseline) | gain |" in md
    assert "| mIoU (test tiles) | 50.00 | 62.50 | 66.00 | +12.50 |" in md
    assert "| mIoU (whole test scenes) | 45.00 | 50.00 | 56.00 | +5.00 |" in md


RUN_WITHOUT_TORCH = """
import runpy, sys
sys.argv = ["stages/report.py"] + sys.argv[1:]
runpy.run_path("stages/report.py", run_name="__main__")
assert "torch" not in sys.modules, "the report stage imported torch"
"""


def test_report_stage_reads_report_baseline_without_torch(artifacts, tmp_path):
    path = write_baseline(tmp_path, 0.66)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({**RUN_PARAMS, "report": {"baseline": str(path)}}))
    args = ["--params", str(tmp_path / "p.yaml"), "--table", str(artifacts.table), "--train-log",
            str(artifacts.train_log), "--out", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-c", RUN_WITHOUT_TORCH, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "**Below `supervised`**: `fixmatch` scores 3.50 points less" in md and "(10 steps)" in md


def test_report_stage_missing_baseline_is_one_line_error(artifacts, tmp_path):
    params = {**RUN_PARAMS, "report": {"baseline": str(tmp_path / "nope.json")}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "stages/report.py", "--params", str(tmp_path / "p.yaml"), "--out",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"error: report.baseline: {tmp_path / 'nope.json'} not found" in proc.stderr
