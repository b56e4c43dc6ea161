"""Small synthetic artifacts (what evaluate, warmup and train write) for report tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr

from s4seg.data.store import TileStoreWriter
from s4seg.report import ReportInputs

CLASSES = ["road", "tree", "water"]
PALETTE = ["#808080", "#00a000", "#0000ff"]
T = 8

# Hand-picked scores (fractions), so the rendered tables can be checked digit by digit.
DATASET = {"warmup": {"miou": 0.5, "mf1": 0.6, "oa": 0.7}, "student": {"miou": 0.625, "mf1": 0.7, "oa": 0.8}}
SCENES = {"warmup": {"miou": 0.45, "mf1": 0.55, "oa": 0.65}, "student": {"miou": 0.5, "mf1": 0.6, "oa": 0.75}}
IOU = {"warmup": [0.75, 0.25, np.nan], "student": [0.8, 0.45, np.nan]}


def eval_table() -> pd.DataFrame:
    rows = []

    def add(model, scope, scene, tile, cls, metric, value):
        rows.append({"model": model, "scope": scope, "scene": scene, "tile": tile, "class": cls, "metric": metric,
                     "value": float(value)})

    for model in ("warmup", "student"):
        for metric, value in DATASET[model].items():
            add(model, "dataset", "", -1, "all", metric, value)
        for metric, value in SCENES[model].items():
            add(model, "scene", "", -1, "all", metric, value)
            add(model, "scene", "s1", -1, "all", metric, value)
        for c, name in enumerate(CLASSES):
            add(model, "dataset", "", -1, name, "iou", IOU[model][c])
            add(model, "dataset", "", -1, name, "pixels", [300, 100, 0][c])
            add(model, "scene", "", -1, name, "iou", IOU[model][c])
        for tile in range(4, 8):
            add(model, "tile", "s1", tile, "all", "miou", 0.1 * tile)
    return pd.DataFrame(rows)


def write_artifacts(root: Path) -> ReportInputs:
    rng = np.random.default_rng(0)
    writer = TileStoreWriter(root / "tiles.zarr", dataset="toy", classes=CLASSES, palette=PALETTE, tile_size=T,
                             stride=T)
    masks = rng.integers(0, 3, size=(8, T, T)).astype(np.uint8)
    masks[:, 0, 0] = 255
    offsets = np.array([(0, T * i) for i in range(8)], dtype=np.int32)
    writer.add_scene("s1", rng.integers(0, 256, size=(8, T, T, 3), dtype=np.uint8), masks, offsets, T, 8 * T)
    writer.close()

    group = zarr.open_group(str(root / "predictions.zarr"), mode="w")
    group.create_array("ids", data=np.arange(4, 8, dtype=np.int64))
    group.create_array("warmup", data=rng.integers(0, 3, size=(4, T, T)).astype(np.uint8))
    group.create_array("student", data=masks[4:].clip(0, 2))
    group.attrs.update({"models": ["warmup", "student"], "classes": CLASSES, "palette": PALETTE, "tile_size": T,
                        "precision": {"evaluate": "bf16", "trained": {"warmup": "bf16", "student": None}}})

    eval_table().to_parquet(root / "eval.parquet")
    steps = np.arange(1, 11)
    pd.DataFrame({"step": steps, "loss": 2.0 / steps, "loss_x": 1.5 / steps, "lr": 0.01 * (1 - steps / 11),
                  "lr_head": 0.1 * (1 - steps / 11)}).to_csv(root / "warmup.csv", index=False)
    pd.DataFrame({"step": steps, "loss": 1.0 / steps, "loss_x": 0.5 / steps, "loss_u_s1": 0.4 / steps,
                  "lr": 0.005 * (1 - steps / 11), "pseudo_acc": 0.8 + 0.01 * steps, "keep_ratio": 0.5 + 0.02 * steps,
                  "epoch": steps // 5}).to_csv(root / "train.csv", index=False)
    # the test's own params, never the workspace's (which `dvc exp run -S` rewrites)
    params = {"method": "fixmatch", "methods": {"fixmatch": {"conf_thresh": 0.95}}, "dataset": {"name": "synthetic"},
              "report": {"num_tiles": 3}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return ReportInputs(params=root / "params.yaml", table=root / "eval.parquet", warmup_log=root / "warmup.csv",
                        train_log=root / "train.csv", tiles=root / "tiles.zarr", predictions=root / "predictions.zarr",
                        summary=root / "summary.json", pseudo=root / "pseudo.parquet", dump=root / "pseudo.zarr")


@pytest.fixture
def artifacts(tmp_path) -> ReportInputs:
    """Inputs of a report; summary, pseudo and dump paths are given but do not exist (optional inputs)."""
    return write_artifacts(tmp_path)
