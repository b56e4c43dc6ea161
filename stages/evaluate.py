"""`evaluate` stage: every model on the test tiles and on whole test scenes (sliding window).

    python stages/evaluate.py --params params.yaml --tiles data/tiles.zarr --split data/split.parquet \
        --model warmup=models/warmup.pt --model student=models/student.pt \
        --table metrics/eval.parquet --summary metrics/summary.json [--predictions metrics/predictions.zarr]

Outputs (each written atomically):
- `--table` Parquet, long format, one row per (model, scope, scene, tile, class, metric) -> value:
    scope "dataset": one confusion matrix accumulated over all test tiles (scene "", tile -1);
    scope "scene":   whole test scenes by sliding window, one group per scene, plus scene "" = the
                     matrix accumulated over all scenes;
    scope "tile":    each test tile alone (class "all" only: miou, mf1, oa, ...), for picking examples.
  class is a class name, or "all" for the means (miou, mf1, mprecision, mrecall, oa, pixels); the
  per-class metrics are iou, f1, precision, recall, pixels (see s4seg.evaluation.metrics).
- `--summary` flat JSON for `dvc metrics diff`: `<model>.miou|mf1|oa` (tiles), `<model>.scene_miou|...`
  (all scenes), and `gain.*` = student - warmup when both are given. NaN is written as null.
- `--predictions` Zarr (default: `predictions.zarr` next to the table): `ids` (N,) int64 test tile ids
  and one (N, T, T) uint8 label array per model, so the report draws overlays without torch; its attribute
  `precision` = {"evaluate": the precision evaluation ran in, "trained": {model: its training precision}}
  (resolved values, s4seg.runtime; the report's overview shows them).

Every model runs in `evaluate.precision` (autocast) with channels_last weights and images (s4seg.runtime).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
import zarr

from s4seg.cli import run_stage
from s4seg.config import EvaluateConfig, load_params
from s4seg.data.split import Split, load_split
from s4seg.data.store import TileStore
from s4seg.errors import CheckpointError, ParamsError
from s4seg.evaluation.metrics import ConfusionMatrix, confusion_matrix, metrics_from_confusion
from s4seg.evaluation.sliding import Predict, predict_scene, predict_tiles
from s4seg.io import atomic_dir, atomic_path, write_text_atomic
from s4seg.runtime import Runtime, make_runtime

log = logging.getLogger("s4seg.stages.evaluate")

SUMMARY_METRICS = ("miou", "mf1", "oa")
COLUMNS = ("model", "scope", "scene", "tile", "class", "metric", "value")


@dataclass
class ModelEvaluation:
    rows: list[dict] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    tile_labels: np.ndarray | None = None  # (N_test, T, T) uint8


def evaluate_model(
    name: str,
    predict: Predict,
    store: TileStore,
    split: Split,
    cfg: EvaluateConfig,
    device: torch.device | str = "cpu",
) -> ModelEvaluation:
    """Score one model on the test tiles and (if cfg.scenes) on whole test scenes."""
    out = ModelEvaluation()
    k, classes = store.num_classes, store.classes

    def add(scope: str, scene: str, tile: int, rows: list[tuple[str, str, float]]) -> None:
        out.rows += [{"model": name, "scope": scope, "scene": scene, "tile": tile, "class": c, "metric": m,
                      "value": v} for c, m, v in rows]

    ids = split.test
    if len(ids) == 0:
        raise ParamsError("split: no test tiles; set split.test_scenes in params.yaml so that some scenes are test")
    labels = predict_tiles(predict, store, ids, cfg.batch_size, device)
    total = ConfusionMatrix(k)
    for tile_id, pred in zip(ids, labels, strict=True):
        matrix = confusion_matrix(pred, store.mask(tile_id), k)
        total.matrix += matrix
        means = metrics_from_confusion(matrix).means()
        add("tile", store.scene_of(tile_id), int(tile_id), [("all", m, v) for m, v in means.items()])
    dataset = total.metrics()
    add("dataset", "", -1, dataset.rows(classes))
    out.summary.update({f"{name}.{m}": dataset.means()[m] for m in SUMMARY_METRICS})
    out.tile_labels = labels
    log.info("%s: test tiles mIoU %.4f, OA %.4f over %d tiles", name, dataset.miou, dataset.oa, len(ids))

    if cfg.scenes:
        window = cfg.window or store.tile_size
        scenes = ConfusionMatrix(k)
        for scene in split.scenes("test"):
            image, mask = store.stitch_scene(scene)
            pred = predict_scene(predict, image, window, cfg.overlap, k, cfg.batch_size, device)
            matrix = confusion_matrix(pred, mask, k)
            scenes.matrix += matrix
            add("scene", scene, -1, metrics_from_confusion(matrix).rows(classes))
        overall = scenes.metrics()
        add("scene", "", -1, overall.rows(classes))
        out.summary.update({f"{name}.scene_{m}": overall.means()[m] for m in SUMMARY_METRICS})
        log.info("%s: whole test scenes (window %d, overlap %.2f) mIoU %.4f", name, window, cfg.overlap,
                 overall.miou)
    return out


def gains(summary: dict[str, float], base: str = "warmup", new: str = "student") -> dict[str, float]:
    """`gain.<metric>` = new - base for every metric both models have."""
    out = {}
    for key, value in summary.items():
        if key.startswith(f"{base}."):
            metric = key[len(base) + 1 :]
            if f"{new}.{metric}" in summary:
                out[f"gain.{metric}"] = summary[f"{new}.{metric}"] - value
    return out


class LoadedModel(NamedTuple):
    """What evaluation needs from a model file. A loader may return a plain (predict, num_classes) pair."""

    predict: Predict
    num_classes: int
    precision: str | None = None  # the precision the model was trained in (model artifact), if known


def load_predictor(path: Path, runtime: Runtime) -> LoadedModel:
    """A model file -> its method's `predict`, on the runtime's device and memory format. The engine's
    loader rebuilds the method."""
    from s4seg.engine.checkpoint import load_method_and_info  # the engine is only needed here

    method, info = load_method_and_info(path, runtime.device)
    runtime.module(method).eval()
    return LoadedModel(method.predict, int(method.num_classes), info.get("precision"))


def parse_models(specs: Sequence[str]) -> dict[str, Path]:
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ParamsError(f"--model {spec!r}: expected NAME=PATH, e.g. warmup=models/warmup.pt")
        if name in models:
            raise ParamsError(f"--model {spec!r}: model name {name!r} given twice")
        models[name] = Path(path)
    return models


def write_outputs(
    results: dict[str, ModelEvaluation],
    store: TileStore,
    ids: np.ndarray,
    table: Path,
    summary_path: Path,
    predictions: Path,
    attrs: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Write the table, the summary and the predictions (with `attrs` added to its attributes)."""
    rows = [r for res in results.values() for r in res.rows]
    frame = pd.DataFrame(rows, columns=list(COLUMNS)).astype({"tile": "int64", "value": "float64"})
    with atomic_path(table) as tmp:
        frame.to_parquet(tmp, index=False)

    summary = {k: v for res in results.values() for k, v in res.summary.items()}
    summary.update(gains(summary))
    # JSON has no NaN: a metric that could not be computed is null.
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else float(v)) for k, v in summary.items()}
    write_text_atomic(summary_path, json.dumps(clean, indent=2) + "\n")

    t = store.tile_size
    with atomic_dir(predictions) as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        group.create_array("ids", data=np.asarray(ids, dtype=np.int64), chunks=(max(1, len(ids)),))
        for name, res in results.items():
            arr = group.create_array(name, shape=(len(ids), t, t), chunks=(1, t, t), dtype="uint8",
                                     dimension_names=("tile", "y", "x"))
            arr[:] = res.tile_labels
        group.attrs.update({"models": list(results), "classes": store.classes, "palette": store.palette,
                            "tile_size": t, **(attrs or {})})
    return clean


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ParamsError(f"params.yaml: evaluate.device: expected auto, cpu or cuda, found {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(f"params.yaml: evaluate.device is {name!r} but CUDA is not available; use auto or cpu")
    return torch.device(name)


def main(argv: Sequence[str] | None = None, loader: Callable[[Path, Runtime], tuple] | None = None
         ) -> dict[str, float]:
    """`loader(path, runtime)` returns a `LoadedModel` or a (predict, num_classes) pair (test doubles)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tiles", required=True)
    parser.add_argument("--split", required=True)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--table", required=True)
    parser.add_argument("--summary", required=True)
    parser.add_argument("--predictions", help="default: predictions.zarr next to --table")
    parser.add_argument("--device", help="overrides evaluate.device: auto (cuda if available) | cpu | cuda")
    args = parser.parse_args(argv)

    cfg = load_params(args.params).evaluate
    models = parse_models(args.model)
    for name, path in models.items():
        if not path.is_file():
            raise CheckpointError(f"{path}: model file for --model {name} not found; run `dvc repro` to build it")
    store, split = TileStore(args.tiles), load_split(args.split)
    runtime = make_runtime(resolve_device(args.device or cfg.device), cfg.precision, where="evaluate.precision")
    log.info("evaluating %s on %d test tiles: %s (evaluate.precision = %s)", ", ".join(models), len(split.test),
             runtime.describe(), cfg.precision)

    results, trained = {}, {}
    for name, path in models.items():
        model = LoadedModel(*(loader or load_predictor)(path, runtime))
        if model.num_classes != store.num_classes:
            raise CheckpointError(
                f"{path}: model predicts {model.num_classes} classes but {args.tiles} has {store.num_classes} "
                f"({', '.join(store.classes)}); retrain it on this tile store"
            )
        results[name] = evaluate_model(name, runtime.predictor(model.predict), store, split, cfg, runtime.device)
        trained[name] = model.precision

    predictions = Path(args.predictions) if args.predictions else Path(args.table).with_name("predictions.zarr")
    precision = {"evaluate": runtime.precision, "trained": trained}
    return write_outputs(results, store, split.test, Path(args.table), Path(args.summary), predictions,
                         attrs={"precision": precision})


if __name__ == "__main__":
    run_stage(main)
