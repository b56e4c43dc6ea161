"""`warmup` stage: supervised training of the model on the labeled tiles (the start of every method).

    python stages/warmup.py --params params.yaml --tiles data/tiles.zarr --split data/split.parquet \
        --out models/warmup.pt --log logs/warmup.csv --checkpoints checkpoints/warmup

Reads the `seed`, `model` and `warmup` sections. An epoch is one pass over the labeled tiles.
Re-running after an interruption resumes from `--checkpoints/last.pt` (same config only).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from s4seg.cli import run_stage
from s4seg.config import load_params
from s4seg.data.split import load_split
from s4seg.data.store import TileStore
from s4seg.engine.loop import fit


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tiles", required=True)
    parser.add_argument("--split", required=True)
    parser.add_argument("--out", required=True, help="model file to write (models/warmup.pt)")
    parser.add_argument("--log", required=True, help="per-step CSV (logs/warmup.csv)")
    parser.add_argument("--checkpoints", required=True, help="resume directory (checkpoints/warmup)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_params(args.params)
    store = TileStore(args.tiles)
    split = load_split(args.split)

    import s4seg.methods  # noqa: F401  (registers the methods)
    from s4seg.engine.method import build_method
    from s4seg.models import build_model

    torch.manual_seed(params.seed)  # model initialisation
    model = build_model(params.model, store.num_classes)
    # `methods.supervised` has no keys; warmup does not depend on the methods section (see dvc.yaml)
    method = build_method("supervised", {}, model, store.num_classes)
    fit(method, store, split, params.warmup, model_cfg=params.model, seed=params.seed, out_path=args.out,
        log_path=args.log, checkpoint_dir=args.checkpoints, labeled_only=True, section="warmup")


if __name__ == "__main__":
    run_stage(main)
