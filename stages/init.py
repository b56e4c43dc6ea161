"""`init` stage: the untrained model every run of the papers' protocol starts from (`train.init: pretrained`).

    python stages/init.py --params params.yaml --tiles data/tiles.zarr --out models/pretrained.pt

Builds the model of the `model` section with its pretrained encoder (`model.weights`: the packaged ImageNet
weights, a local file, or null for random init) and a freshly initialised decoder, seeded by `seed`
exactly as the warmup stage seeds it (so models/pretrained.pt is the warmup's own step 0), and writes it
as an s4seg model artifact: method `supervised`, step 0. The tile store gives the number of classes,
their names and palette. Cheap (seconds): `dvc repro` runs it whatever `train.init` says, and
`train` reads `models/${train.init}.pt`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from s4seg.cli import run_stage
from s4seg.config import load_params
from s4seg.data.store import TileStore


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tiles", required=True)
    parser.add_argument("--out", required=True, help="model file to write (models/pretrained.pt)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_params(args.params)
    store = TileStore(args.tiles)

    import s4seg.methods  # noqa: F401  (registers the methods)
    from s4seg.engine.checkpoint import model_artifact, save_torch_atomic
    from s4seg.engine.method import build_method
    from s4seg.models import build_model

    torch.manual_seed(params.seed)  # the decoder's initialisation, the same draw as the warmup stage's
    model = build_model(params.model, store.num_classes)
    method = build_method("supervised", {}, model, store.num_classes)
    artifact = model_artifact(method, model_cfg=params.model, classes=store.classes, palette=store.palette,
                              step=0, train_cfg=None)  # untrained: no schedule (nor `train` as a dependency)
    artifact["seed"] = params.seed
    save_torch_atomic(artifact, args.out)


if __name__ == "__main__":
    run_stage(main)
