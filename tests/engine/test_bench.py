"""`bench_train`: one subprocess per method, seconds per iteration, peak RSS, ratio to fixmatch."""

from __future__ import annotations

import json

import pytest
import torch

from s4seg.config import ModelConfig, Params, TrainConfig
from s4seg.engine.bench import format_table, peak_rss_mib, synthetic_batch
from s4seg.errors import ParamsError


def test_peak_rss_is_plausible():
    big = torch.ones(64, 2**20 // 4)  # 64 MiB
    assert peak_rss_mib() >= 64
    del big


def test_synthetic_batch_fills_every_field():
    b = synthetic_batch(2, 16, 5, torch.Generator().manual_seed(0))
    assert b.x.shape == b.u_s2_mix.shape == (2, 3, 16, 16) and int(b.y.max()) < 5
    assert b.box1.any() and b.valid_u.all()


def _tiny_params() -> Params:
    return Params(model=ModelConfig(encoder="resnet18", weights=None), train=TrainConfig(device="cpu"))


def test_unknown_method_fails_before_running(tmp_path):
    from s4seg.engine.bench import bench_train

    with pytest.raises(ParamsError, match="'nope' is not registered; choose one of: .*fixmatch, .*supervised"):
        bench_train(["nope"], _tiny_params(), batch=1, crop=32, iters=1, out_json=tmp_path / "b.json")


def test_bench_train_aggregates_and_writes_json(tmp_path, capsys, monkeypatch):
    """The per-method runs in this process (bench_one), to check ratios, JSON and table cheaply."""
    from s4seg.engine import bench

    monkeypatch.setattr(bench, "bench_in_subprocess", bench.bench_one)
    out = tmp_path / "bench" / "train.json"
    rows = bench.bench_train(["fixmatch", "supervised"], _tiny_params(), batch=2, crop=32, iters=1, out_json=out)
    assert json.loads(out.read_text()) == rows
    assert [r["method"] for r in rows] == ["fixmatch", "supervised"]
    assert rows[0]["ratio_to_fixmatch"] == 1.0
    assert rows[1]["ratio_to_fixmatch"] == pytest.approx(rows[1]["sec_per_iter"] / rows[0]["sec_per_iter"])
    assert all(r["sec_per_iter"] > 0 and r["peak_rss_mib"] > 50 for r in rows)
    printed = capsys.readouterr().out
    assert printed.strip() == format_table(rows) and "supervised" in printed


@pytest.mark.slow
def test_bench_subprocess_reports_its_own_run():
    from s4seg.engine.bench import bench_in_subprocess

    row = bench_in_subprocess("supervised", _tiny_params(), batch=2, crop=32, iters=1)
    assert row["method"] == "supervised" and row["device"] == "cpu" and row["sec_per_iter"] > 0
    assert row["peak_rss_mib"] > 50
