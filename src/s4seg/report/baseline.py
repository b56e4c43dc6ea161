"""Baselines: a finished run's metrics, budget and params, saved to compare another run with at equal iterations.

A stage cannot read DVC's experiment metrics without calling dvc, so the comparison goes through a small
file. After a run of the baseline (typically `dvc exp run -S method=supervised`, same params otherwise):

    s4seg baseline                      # -> baselines/supervised.json
    dvc exp run -S method=fixmatch -S report.baseline=baselines/supervised.json

The file (format "s4seg-baseline/1", JSON) holds the run's `metrics/summary.json`, its number of
optimiser steps (the last step of `logs/train.csv`) and the params sections that define its result.
The report compares those with the current run's (`protocol_differences`) and says plainly whether the
two ran at equal iterations on the same data, split, seed, model and schedule. dvc.yaml makes the
`baselines/` folder a dependency of `report`, so a baseline kept there re-runs the report when it changes.
This module reads and writes JSON, YAML and CSV only (no torch).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from s4seg.errors import ParamsError
from s4seg.io import write_text_atomic

BASELINE_FORMAT = "s4seg-baseline/1"
# The params that define a run's result (besides `method` and its section, which the baseline is about).
PROTOCOL_SECTIONS = ("seed", "dataset", "tiling", "split", "model", "warmup", "train")
# Keys that change how a run is observed or where it runs, not what it learns.
IGNORED_KEYS = frozenset({"device", "num_workers", "checkpoint_every", "log_every", "snapshot_every",
                          "snapshot_tiles"})


@dataclass(frozen=True)
class Baseline:
    path: Path
    method: str
    steps: int | None  # optimiser steps of the baseline's train stage (None: unknown)
    params: dict[str, Any]  # PROTOCOL_SECTIONS of its params.yaml
    metrics: dict[str, float | None]  # its metrics/summary.json (`student.*` is the baseline's trained model)

    def value(self, metric: str) -> float | None:
        """The baseline's trained model's `metric` (e.g. miou, scene_miou), or None."""
        value = self.metrics.get(f"student.{metric}")
        return float(value) if isinstance(value, (int, float)) else None


def last_step(train_log: str | Path | None) -> int | None:
    """The last logged optimiser step of a train CSV log (the run's length), or None when unknown."""
    if train_log is None or not Path(train_log).is_file():
        return None
    try:
        frame = pd.read_csv(train_log)
    except pd.errors.EmptyDataError:
        return None
    if "step" not in frame.columns or frame.empty:
        return None
    return int(frame["step"].max())


def save_baseline(summary: str | Path, params: str | Path, train_log: str | Path | None, out: str | Path) -> Path:
    """Write a baseline file from a finished run's summary.json, params.yaml and train log."""
    summary, params = Path(summary), Path(params)
    for path, what in ((summary, "metrics summary"), (params, "params file")):
        if not path.is_file():
            raise ParamsError(f"{path}: {what} not found; run the baseline first (e.g. `dvc exp run -S "
                              "method=supervised`), then `s4seg baseline` in the same workspace")
    raw = yaml.safe_load(params.read_text()) or {}
    record = {
        "format": BASELINE_FORMAT,
        "method": raw.get("method"),
        "steps": last_step(train_log),
        "params": {k: raw[k] for k in PROTOCOL_SECTIONS if k in raw},
        "metrics": json.loads(summary.read_text()),
    }
    write_text_atomic(out, json.dumps(record, indent=2) + "\n")
    return Path(out)


def read_baseline(path: str | Path) -> Baseline:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ParamsError(f"report.baseline: {path} is not a readable baseline file ({e}); "
                          "write one with `s4seg baseline`") from e
    if not isinstance(record, dict) or record.get("format") != BASELINE_FORMAT:
        raise ParamsError(f"report.baseline: {path} is not an s4seg baseline (format {BASELINE_FORMAT!r}); "
                          "write one with `s4seg baseline` after the baseline run")
    steps = record.get("steps")
    return Baseline(path, str(record.get("method")), int(steps) if steps is not None else None,
                    dict(record.get("params") or {}), dict(record.get("metrics") or {}))


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {k: v for key, sub in value.items() for k, v in _flatten(f"{prefix}.{key}" if prefix else key,
                                                                           sub).items()}
    return {prefix: value}


def protocol_differences(baseline: Baseline, params: Mapping[str, Any], steps: int | None) -> list[str]:
    """What differs between the baseline's run and this one, e.g. ["iterations: 336 vs 168", "seed: 1 vs 0"].

    Compared: the optimiser steps of `train` (when both are known) and the PROTOCOL_SECTIONS params, except
    IGNORED_KEYS; the warmup only when one of the two runs starts from it (`train.init: warmup`).
    Values are "baseline vs this run". An empty list: equal iterations, same data, split, seed, model and schedule.
    """
    out = []
    if baseline.steps is not None and steps is not None and baseline.steps != steps:
        out.append(f"iterations: {baseline.steps} vs {steps}")
    inits = {((p.get("train") or {}).get("init") or "warmup") for p in (baseline.params, params)}
    sections = [s for s in PROTOCOL_SECTIONS if s != "warmup" or "warmup" in inits]
    theirs, ours = (_flatten("", {s: p.get(s) for s in sections}) for p in (baseline.params, params))
    for flat in (theirs, ours):
        flat.setdefault("train.init", "warmup")  # params written before `train.init` existed
    for key in sorted(set(theirs) | set(ours)):
        if key.rsplit(".", 1)[-1] in IGNORED_KEYS:
            continue
        if _same(theirs.get(key), ours.get(key)):
            continue
        out.append(f"{key}: {_show(theirs.get(key))} vs {_show(ours.get(key))}")
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def _show(value: Any) -> str:
    return "unset" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
