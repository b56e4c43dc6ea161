"""`bench_train`: one subprocess per method and path (fp32, fast), seconds per iteration, peak RSS, speed-up, ratio to
fixmatch; the UniMatch reference configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from s4seg.config import ModelConfig, Params, TrainConfig
from s4seg.engine.bench import format_table, peak_rss_mib, synthetic_batch
from s4seg.errors import ParamsError

SHIPPED_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


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
    """The per-method runs in this process (bench_one), to check both paths, ratios, JSON and table cheaply."""
    from s4seg.engine import bench

    monkeypatch.setattr(bench, "bench_in_subprocess", bench.bench_one)
    out = tmp_path / "bench" / "train.json"
    rows = bench.bench_train(["fixmatch", "supervised"], _tiny_params(), batch=2, crop=32, iters=1, out_json=out,
                             precision="bf16")
    assert json.loads(out.read_text()) == rows
    assert [(r["method"], r["path"]) for r in rows] == [("fixmatch", "fp32"), ("fixmatch", "fast"),
                                                        ("supervised", "fp32"), ("supervised", "fast")]
    # fp32 is the old path (fp32, contiguous); fast is the pipeline's runtime in the asked precision
    assert [(r["precision"], r["memory_format"]) for r in rows[:2]] == [("fp32", "contiguous"),
                                                                      ("bf16", "channels_last")]
    for slow, fast in (rows[:2], rows[2:]):
        assert slow["speedup"] == fast["speedup"] == pytest.approx(slow["sec_per_iter"] / fast["sec_per_iter"])
    assert rows[0]["ratio_to_fixmatch"] == rows[1]["ratio_to_fixmatch"] == 1.0  # per path
    assert rows[3]["ratio_to_fixmatch"] == pytest.approx(rows[3]["sec_per_iter"] / rows[1]["sec_per_iter"])
    assert all(r["sec_per_iter"] > 0 and r["peak_rss_mib"] > 50 for r in rows)
    printed = capsys.readouterr().out
    assert printed.strip() == format_table(rows) and "supervised" in printed and "fast = bf16" in printed


def test_bad_precision_fails_before_running(tmp_path):
    from s4seg.engine.bench import bench_train

    with pytest.raises(ParamsError, match="precision = 'fp8'"):
        bench_train(["supervised"], _tiny_params(), batch=1, crop=32, iters=1, out_json=tmp_path / "b.json",
                    precision="fp8")


def test_reference_configuration_is_unimatchs():
    from s4seg.engine.bench import REFERENCE, reference_params

    params = reference_params(_tiny_params())
    model = params.model
    assert (model.arch, model.encoder, model.deep_stem, model.weights) == ("deeplabv3plus", "resnet50", True, None)
    assert (model.output_stride, model.decoder_channels) == (16, 256)
    assert (REFERENCE["batch"], REFERENCE["crop"], REFERENCE["num_classes"]) == (2, 321, 21)
    assert params.train == _tiny_params().train  # only the model changes


def test_cli_reference_mode_passes_its_configuration(monkeypatch, tmp_path):
    from s4seg import cli
    from s4seg.engine import bench

    seen = {}
    monkeypatch.setattr(bench, "bench_train", lambda methods, params, **kw: seen.update(methods=methods,
                                                                                        params=params, **kw))
    cli.main(["bench", "train", "--reference", "--iters", "2", "--threads", "1", "--params", str(SHIPPED_PARAMS)])
    assert seen["methods"] == ["supervised", "unimatch"] and (seen["batch"], seen["crop"]) == (2, 321)
    assert seen["threads"] == 1
    assert seen["num_classes"] == 21 and seen["params"].model.encoder == "resnet50" and seen["precision"] == "auto"
    assert str(seen["out_json"]).endswith("reference.json")
    cli.main(["bench", "train", "--methods", "fixmatch", "--precision", "fp32", "--params", str(SHIPPED_PARAMS)])
    assert (seen["methods"], seen["batch"], seen["crop"], seen["precision"]) == (["fixmatch"], 4, 192, "fp32")


@pytest.mark.slow
def test_bench_subprocess_reports_its_own_run():
    from s4seg.engine.bench import bench_in_subprocess

    row = bench_in_subprocess("supervised", _tiny_params(), batch=2, crop=32, iters=1, threads=1)
    assert row["method"] == "supervised" and row["device"] == "cpu" and row["sec_per_iter"] > 0
    assert row["torch_threads"] == 1 and row["precision"] == "fp32" and row["memory_format"] == "contiguous"
    assert row["peak_rss_mib"] > 50


def test_timing_sections_are_a_no_op_until_recording_then_add_up():
    from s4seg import timing

    with timing.section("never"):  # not recording: nothing is kept
        pass
    assert timing.recorded() == {}
    timing.start_recording()
    for _ in range(3):
        with timing.section("part"):
            pass
    assert set(timing.recorded()) == {"part"} and timing.recorded()["part"] >= 0
    timing.start_recording()  # resets
    assert timing.recorded() == {}
    with timing.section("last"):
        pass
    assert set(timing.stop_recording()) == {"last"} and timing.recorded() == {}


def test_regionmatch_bench_reports_the_share_of_connected_components():
    from s4seg.engine.bench import bench_one

    row = bench_one("regionmatch", _tiny_params(), 2, 32, 1, threads=1)
    part = row["sections"]["connected_components"]
    assert 0 < part["sec_per_iter"] < row["sec_per_iter"] and part["share"] == pytest.approx(
        part["sec_per_iter"] / row["sec_per_iter"])
    rows = [{**row, "path": path, "speedup": 1.0} for path in ("fp32", "fast")]
    assert "  regionmatch: connected_components" in format_table(rows)
