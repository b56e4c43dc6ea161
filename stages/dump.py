"""`dump` stage: the trained method's pseudo-labels of every unlabeled tile, and their quality.

    python stages/dump.py --params params.yaml --tiles data/tiles.zarr --split data/split.parquet \
        --model models/student.pt --warmup models/warmup.pt --out dumps/pseudo.zarr \
        --metrics metrics/pseudo.json --table metrics/pseudo.parquet

Outputs (each written atomically):
- `--out` the Zarr dump (layout: s4seg.evaluation.dump), written with the method's own `pseudo_labels`.
- `--metrics` flat JSON for `dvc metrics diff`: `student.<m>`, `warmup.<m>` and `gain.<m>` = student - warmup
  for every metric of s4seg.evaluation.pseudo_quality (accuracy, accuracy_all, coverage, mining_ratio,
  effective_ratio, kept_share, class_bias, propagated_coverage, propagated_accuracy, relabelled_coverage,
  relabelled_accuracy, relabelled_prior_accuracy, threshold_coverage, region_accuracy, region_consistency,
  regions). NaN is written as null.
- `--table` Parquet, long: (model, class, metric, value), per class and class "all".
- `--curve` (optional) CSV for `dvc plots`: accuracy against coverage of both models' pseudo-labels as a
  confidence threshold sweeps (s4seg.evaluation.pseudo_quality: `curve`), columns `threshold, coverage,
  accuracy` (the student) and `warmup_coverage, warmup_accuracy`; a row per threshold where either changes.

The warmup model is scored on the same tiles with the trained method's fixed confidence threshold when the
method has one (`conf_thresh`), else keeping every pixel (`s4seg.evaluation.dump.warmup_threshold`); the
rule used is recorded in the dump's attribute `warmup_selection`. Those scores depend on the warmup model and
the rule only: with `--cache` they are computed once and reused by every experiment that shares them
(content-addressed: warmup file hash, tiles, threshold, code).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from s4seg.cli import run_stage
from s4seg.config import DumpConfig, load_params
from s4seg.data.split import load_split
from s4seg.data.store import TileStore
from s4seg.engine.checkpoint import code_hash, file_hash
from s4seg.engine.method import Method
from s4seg.errors import DataError
from s4seg.evaluation.dump import cached_quality, measure_quality, params_hash, warmup_threshold, write_dump
from s4seg.evaluation.pseudo_quality import PseudoQuality, flat_metrics
from s4seg.io import atomic_path, write_text_atomic
from s4seg.runtime import make_runtime

log = logging.getLogger("s4seg.stages.dump")

TABLE_COLUMNS = ("model", "class", "metric", "value")
CURVE_COLUMNS = ("threshold", "coverage", "accuracy", "warmup_coverage", "warmup_accuracy")


def curve_frame(student: PseudoQuality, warmup: PseudoQuality) -> pd.DataFrame:
    """Both models' accuracy-coverage curves on the shared threshold grid; rows where neither changes (no pixel
    in that confidence bin) are dropped, so every row is a distinct operating point of one model at least."""
    s, w = student.curve(), warmup.curve()
    frame = pd.DataFrame({"threshold": s["threshold"], "coverage": s["coverage"], "accuracy": s["accuracy"],
                          "warmup_coverage": w["coverage"], "warmup_accuracy": w["accuracy"]})
    changes = (student.conf_valid > 0) | (warmup.conf_valid > 0)
    return frame[changes].reset_index(drop=True)


def run_dump(
    cfg: DumpConfig,
    store: TileStore,
    unlabeled: Sequence[int],
    student: Method,
    student_info: dict[str, Any],
    warmup: Method,
    *,
    out: str | Path,
    metrics: str | Path,
    table: str | Path,
    model_path: str | Path = "",
    warmup_path: str | Path | None = None,
    cache: str | Path | None = None,
    curve: str | Path | None = None,
    progress: bool | None = None,
) -> dict[str, float | None]:
    """Dump the student's pseudo-labels, score them and the warmup model's; write the three outputs."""
    if len(unlabeled) == 0:
        raise DataError(f"{store.path}: the split has no unlabeled tiles, so there is nothing to dump; "
                        "lower split.labeled in params.yaml")
    threshold = warmup_threshold(student_info.get("method_config") or {})
    selection = "all valid pixels" if threshold is None else f"conf >= {threshold}"
    attrs = {
        "method": student_info.get("method", student.name),
        "iteration": student_info.get("step"),
        "params_hash": params_hash(student_info),
        "model": str(model_path),
        "warmup_selection": selection,
    }
    runtime = make_runtime(cfg.device, cfg.precision, where="dump.precision")
    log.info("dump precision: %s (dump.precision = %s)", runtime.describe(), cfg.precision)
    student_q = write_dump(student, store, unlabeled, out, batch_size=cfg.batch_size, device=runtime.device,
                           precision=runtime.precision, min_region_pixels=cfg.min_region_pixels, attrs=attrs,
                           progress=progress)
    student.cpu()  # free the accelerator for the warmup model
    # the warmup's scores depend on the warmup model and the selection rule only, not on the experiment:
    # computed once per (warmup file, tiles, rule, precision, code), then reused from `cache`
    key = {"warmup": file_hash(warmup_path) if warmup_path else None, "tiles": str(Path(store.path).resolve()),
           "unlabeled": [int(i) for i in unlabeled], "threshold": threshold,
           "min_region_pixels": cfg.min_region_pixels, "precision": runtime.precision, "code": code_hash()}
    warmup_q = cached_quality(
        cache if warmup_path else None, key,
        lambda: measure_quality(warmup, store, unlabeled, batch_size=cfg.batch_size, device=runtime.device,
                                precision=runtime.precision, min_region_pixels=cfg.min_region_pixels,
                                threshold=threshold, progress=progress))
    flat = flat_metrics({"student": student_q, "warmup": warmup_q})
    rows = student_q.table("student", store.classes) + warmup_q.table("warmup", store.classes)
    frame = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    with atomic_path(table) as tmp:
        frame.to_parquet(tmp, index=False)
    if curve is not None:
        with atomic_path(curve) as tmp:
            curve_frame(student_q, warmup_q).to_csv(tmp, index=False, float_format="%.6g")
    write_text_atomic(metrics, json.dumps(flat, indent=2) + "\n")
    log.info("pseudo-labels of %d tiles: accuracy %.3f (warmup %.3f), coverage %.3f (warmup %.3f)",
             len(unlabeled), *(flat.get(k) or float("nan") for k in
                               ("student.accuracy", "warmup.accuracy", "student.coverage", "warmup.coverage")))
    return flat


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--tiles", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--model", required=True, help="the trained method's model file")
    p.add_argument("--warmup", required=True, help="the supervised warmup model file")
    p.add_argument("--out", required=True, help="dumps/pseudo.zarr")
    p.add_argument("--metrics", required=True, help="metrics/pseudo.json")
    p.add_argument("--table", required=True, help="metrics/pseudo.parquet")
    p.add_argument("--curve", help="metrics/pseudo_curve.csv: accuracy against coverage as the threshold sweeps")
    p.add_argument("--cache", help="folder for results that depend on the warmup model only (reused across "
                                   "experiments; .s4seg-cache); none: recompute them every time")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    from s4seg.engine.checkpoint import load_method, read_model_file

    args = parse_args(argv)
    params = load_params(args.params)
    store = TileStore(args.tiles)
    split = load_split(args.split)
    student_info = {k: v for k, v in read_model_file(args.model).items() if k != "state_dict"}
    run_dump(params.dump, store, split.unlabeled, load_method(args.model), student_info, load_method(args.warmup),
             out=args.out, metrics=args.metrics, table=args.table, model_path=args.model, warmup_path=args.warmup,
             cache=args.cache, curve=args.curve)


if __name__ == "__main__":
    run_stage(main)
