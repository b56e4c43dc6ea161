"""The dump stage end to end on a tiny store: dump, pseudo.json, pseudo.parquet, and the report sections
that read them; plus `main` on real model files written with the engine's artifact format."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
import zarr
from torch import Tensor, nn

from s4seg.config import DumpConfig
from s4seg.data.split import COLUMNS
from s4seg.data.store import TileStore, TileStoreWriter
from s4seg.engine.method import Method, MethodConfig, PseudoLabels
from s4seg.errors import DataError
from s4seg.evaluation.pseudo_quality import METRICS
from s4seg.evaluation.snapshots import SnapshotWriter
from s4seg.report import ReportInputs
from s4seg.report.pseudo_section import pseudo_section

REPO = Path(__file__).resolve().parents[2]
T, K = 16, 2


def _stage():
    spec = importlib.util.spec_from_file_location("dump_stage", REPO / "stages" / "dump.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _store(path: Path) -> TileStore:
    rng = np.random.default_rng(0)
    w = TileStoreWriter(path, dataset="tiny", classes=["a", "b"], palette=["#000000", "#ffffff"], tile_size=T,
                        stride=T)
    masks = rng.integers(0, K, (4, T, T)).astype(np.uint8)
    masks[:, 0] = 255
    w.add_scene("s", rng.integers(0, 256, (4, T, T, 3), dtype=np.uint8), masks,
                np.array([[0, 0], [0, T], [T, 0], [T, T]]), 2 * T, 2 * T)
    w.close()
    return TileStore(path)


class Thresholded(Method):
    """1x1 conv; keeps conf >= 0.5 (a stand-in for a trained FixMatch-like method)."""

    name = "thresholded"

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        super().__init__(MethodConfig(), nn.Conv2d(3, K, 1), K)

    def pseudo_labels(self, images: Tensor, valid: Tensor | None = None) -> PseudoLabels:
        conf, label = self.predict(images).softmax(1).max(1)
        return PseudoLabels(label=label, conf=conf, keep=conf >= 0.5)


def test_run_dump_writes_dump_metrics_table_and_report_sections(tmp_path: Path) -> None:
    stage = _stage()
    store = _store(tmp_path / "tiles.zarr")
    info = {"method": "thresholded", "method_config": {"conf_thresh": 0.6}, "model_config": {"arch": "x"},
            "step": 12}
    out, metrics, table = tmp_path / "dumps/pseudo.zarr", tmp_path / "metrics/pseudo.json", tmp_path / "p.parquet"
    # fp32: the coverage is checked below against an fp32 forward pass, at a threshold bf16 rounding can cross
    cfg = DumpConfig(batch_size=3, device="cpu", precision="fp32")
    curve = tmp_path / "metrics/pseudo_curve.csv"
    flat = stage.run_dump(cfg, store, [1, 2, 3], Thresholded(0), info, Thresholded(1), out=out, metrics=metrics,
                          table=table, model_path="models/student.pt", curve=curve, progress=False)
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["method"] == "thresholded" and g.attrs["iteration"] == 12
    assert g.attrs["warmup_selection"] == "conf >= 0.6" and len(g.attrs["params_hash"]) == 16
    assert g.attrs["precision"] == "fp32"
    assert g["pseudo"].shape == (3, T, T)
    on_disk = json.loads(metrics.read_text())
    assert on_disk == flat
    assert set(on_disk) == {f"{m}.{k}" for m in ("student", "warmup", "gain") for k in METRICS}
    assert on_disk["gain.accuracy"] == pytest.approx(on_disk["student.accuracy"] - on_disk["warmup.accuracy"])
    # the warmup model is scored with the student's threshold 0.6: coverage = share of its conf >= 0.6
    warmup = Thresholded(1)
    images = torch.from_numpy(np.stack([store.image(i) for i in (1, 2, 3)])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        conf = warmup.model(images).softmax(1).amax(1).numpy()
    gt = np.stack([store.mask(i) for i in (1, 2, 3)])
    valid = gt != 255
    assert on_disk["warmup.coverage"] == pytest.approx((conf[valid] >= 0.6).mean(), abs=1e-3)
    frame = pd.read_parquet(table)
    assert list(frame.columns) == ["model", "class", "metric", "value"]
    assert set(frame["model"]) == {"student", "warmup"} and set(frame["class"]) == {"a", "b", "all"}
    overall = frame[(frame["class"] == "all") & (frame["model"] == "student")].set_index("metric")["value"]
    assert overall["coverage"] == pytest.approx(on_disk["student.coverage"])
    # the curve: the student keeps conf >= 0.5, so its row at threshold 0.5 is its own coverage and accuracy
    # (up to a pixel, 1/360: the curve reads the confidences as dumped, in float16); the warmup's row at 0.6 is
    # its scored selection
    sweep = pd.read_csv(curve)
    assert list(sweep.columns) == ["threshold", "coverage", "accuracy", "warmup_coverage", "warmup_accuracy"]
    assert (np.diff(sweep["threshold"]) > 0).all() and (np.diff(sweep["coverage"]) <= 0).all()
    at = sweep.set_index("threshold")
    assert at.loc[0.5, "coverage"] == pytest.approx(on_disk["student.coverage"], abs=3e-3)
    assert at.loc[0.5, "accuracy"] == pytest.approx(on_disk["student.accuracy"], abs=3e-3)
    assert at.loc[0.6, "warmup_coverage"] == pytest.approx(on_disk["warmup.coverage"], abs=1e-6)
    assert on_disk["student.threshold_coverage"] >= on_disk["student.coverage"] - 3e-3

    # the report sections render from these artifacts (+ snapshots of the train stage)
    snapshots = tmp_path / "snapshots.zarr"
    with SnapshotWriter(snapshots, store, [1, 3]) as writer:
        for step in (0, 5, 10):
            writer.add(step, Thresholded(step).pseudo_labels(torch.from_numpy(writer.images())))
    inputs = ReportInputs(pseudo=table, pseudo_summary=metrics, pseudo_curve=curve, dump=out, snapshots=snapshots,
                          tiles=store.path)
    markdown, figures = pseudo_section(inputs, tmp_path / "figures")
    assert "## Pseudo-label quality" in markdown and "## Pseudo-labels during training" in markdown
    assert f"| coverage | {100 * on_disk['warmup.coverage']:.1f} | {100 * on_disk['student.coverage']:.1f} |" \
        in markdown
    assert all(p.is_file() for p in figures)
    assert {p.name for p in figures} >= {"pseudo_per_class.png", "pseudo_curve.png", "pseudo_snapshots_curve.png",
                                         "pseudo_snapshots_strip.png", "pseudo_tile_1.png"}


def test_warmup_scores_are_computed_once_per_warmup_and_rule(tmp_path: Path, monkeypatch) -> None:
    stage = _stage()
    store = _store(tmp_path / "tiles.zarr")
    warmup_file = tmp_path / "warmup.pt"
    warmup_file.write_bytes(b"the warmup model's bytes")
    info = {"method": "thresholded", "method_config": {"conf_thresh": 0.6}, "model_config": {}, "step": 1}
    cache = tmp_path / "cache"

    def dump(student: int, info: dict, name: str) -> dict:
        return stage.run_dump(DumpConfig(batch_size=3, device="cpu"), store, [1, 2, 3], Thresholded(student), info,
                              Thresholded(1), out=tmp_path / name / "d.zarr", metrics=tmp_path / name / "m.json",
                              table=tmp_path / name / "t.parquet", warmup_path=warmup_file, cache=cache,
                              progress=False)

    first = dump(0, info, "a")
    assert len(list(cache.glob("*.npz"))) == 1
    calls = []
    monkeypatch.setattr(stage, "measure_quality", lambda *a, **k: calls.append(1) or pytest.fail("recomputed"))
    second = dump(2, info, "b")  # another experiment, same warmup and rule: reused
    assert not calls
    assert {k: v for k, v in second.items() if k.startswith("warmup.")} == \
        {k: v for k, v in first.items() if k.startswith("warmup.")}
    monkeypatch.undo()
    dump(0, {**info, "method_config": {"conf_thresh": 0.9}}, "c")  # another selection rule: computed again
    warmup_file.write_bytes(b"another warmup")
    dump(0, info, "d")  # another warmup model: computed again
    assert len(list(cache.glob("*.npz"))) == 3


def test_dump_params_are_validated() -> None:
    from s4seg.config import from_dict
    from s4seg.errors import ParamsError

    with pytest.raises(ParamsError, match=r"params.yaml: dump: batch_size = 0: expected a positive number"):
        from_dict(DumpConfig, {"batch_size": 0}, where="params.yaml: dump")
    with pytest.raises(ParamsError, match=r"min_region_pixels = 0: expected 1 or more"):
        from_dict(DumpConfig, {"min_region_pixels": 0}, where="params.yaml: dump")


def test_run_dump_without_unlabeled_tiles_fails(tmp_path: Path) -> None:
    stage = _stage()
    store = _store(tmp_path / "tiles.zarr")
    with pytest.raises(DataError, match="no unlabeled tiles"):
        stage.run_dump(DumpConfig(), store, [], Thresholded(0), {}, Thresholded(1), out=tmp_path / "d.zarr",
                       metrics=tmp_path / "m.json", table=tmp_path / "t.parquet")


def test_main_on_model_files(tmp_path: Path) -> None:
    """`main` with the dvc.yaml arguments, on model files of a tiny random-init model."""
    import s4seg.methods  # noqa: F401  (fills the method registry)
    from s4seg.config import ModelConfig, TrainConfig, from_dict
    from s4seg.engine.checkpoint import model_artifact, save_torch_atomic
    from s4seg.engine.method import build_method
    from s4seg.models import build_model

    stage = _stage()
    store = _store(tmp_path / "tiles.zarr")
    split = pd.DataFrame({"id": [0, 1, 2, 3], "scene": "s", "x": [0, T, 0, T], "y": [0, 0, T, T],
                          "role": ["labeled", "unlabeled", "unlabeled", "test"], "ratio": 0.5, "seed": 0})
    split[list(COLUMNS)].to_parquet(tmp_path / "split.parquet")
    model_cfg = from_dict(ModelConfig, {"encoder": "resnet18", "weights": None}, where="test")
    for name, method in (("warmup", "supervised"), ("student", "fixmatch")):
        torch.manual_seed(0)
        m = build_method(method, {}, build_model(model_cfg, K), K)
        save_torch_atomic(model_artifact(m, model_cfg=model_cfg, classes=["a", "b"], palette=["#000000", "#ffffff"],
                                         step=3, train_cfg=TrainConfig()), tmp_path / f"{name}.pt")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"dump": {"batch_size": 2, "device": "cpu"}}))
    stage.main(["--params", str(tmp_path / "params.yaml"), "--tiles", str(store.path), "--split",
                str(tmp_path / "split.parquet"), "--model", str(tmp_path / "student.pt"), "--warmup",
                str(tmp_path / "warmup.pt"), "--out", str(tmp_path / "pseudo.zarr"), "--metrics",
                str(tmp_path / "pseudo.json"), "--table", str(tmp_path / "pseudo.parquet")])
    g = zarr.open_group(str(tmp_path / "pseudo.zarr"), mode="r")
    assert g.attrs["method"] == "fixmatch" and g.attrs["iteration"] == 3
    assert g["tile_id"][:].tolist() == [1, 2]
    assert g.attrs["warmup_selection"] == "conf >= 0.95"
    assert json.loads((tmp_path / "pseudo.json").read_text())["student.coverage"] is not None
