"""`report` stage: reports/report.md, reports/report.html and reports/figures/*.png from the artifacts.

    python stages/report.py --params params.yaml --table metrics/eval.parquet --summary metrics/summary.json \
        --warmup-log logs/warmup.csv --train-log logs/train.csv --tiles data/tiles.zarr \
        --split data/split.parquet --predictions metrics/predictions.zarr --pseudo metrics/pseudo.parquet \
        --pseudo-summary metrics/pseudo.json --pseudo-curve metrics/pseudo_curve.csv --dump dumps/pseudo.zarr \
        --snapshots dumps/snapshots.zarr --out reports

Every input is optional: a missing file leaves out the sections that need it (listed at the end of
the report). No torch is imported.

`report.baseline` (params.yaml) names a baseline file (`s4seg baseline`, see s4seg.report.baseline): the
headline then compares the trained model with that run (typically `supervised` at equal iterations) as well
as with the warmup. A baseline that is named but missing is an error, not a silently shorter report.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from s4seg.cli import run_stage
from s4seg.config import load_params
from s4seg.errors import ParamsError
from s4seg.report import ReportInputs, build_report

INPUTS = ("table", "summary", "warmup_log", "train_log", "tiles", "split", "predictions", "pseudo",
          "pseudo_summary", "pseudo_curve", "dump", "snapshots")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    for name in INPUTS:
        parser.add_argument("--" + name.replace("_", "-"), type=Path)
    parser.add_argument("--out", required=True, type=Path, help="report directory")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    baseline = Path(params.report.baseline) if params.report.baseline is not None else None
    if baseline is not None and not baseline.is_file():
        raise ParamsError(f"report.baseline: {baseline} not found; write it with `s4seg baseline` after the "
                          "baseline run (e.g. `dvc exp run -S method=supervised`), or set report.baseline to null")
    inputs = ReportInputs(params=Path(args.params), baseline=baseline,
                          **{name: getattr(args, name) for name in INPUTS})
    build_report(inputs, args.out, params.report, title=f"s4seg report: {params.method} on {params.dataset.name}")


if __name__ == "__main__":
    run_stage(main)
