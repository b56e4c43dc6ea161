"""`train` stage: the chosen method (`method`, `methods.<method>`), from the model `train.init` names.

    python stages/train.py --params params.yaml --tiles data/tiles.zarr --split data/split.parquet \
        --init models/warmup.pt --out models/student.pt --log logs/train.csv --checkpoints checkpoints/train \
        --snapshots dumps/snapshots.zarr

`--init` is `models/${train.init}.pt` in dvc.yaml: `models/warmup.pt` (`train.init: warmup`, the warm
start: the supervised warmup model) or `models/pretrained.pt` (`train.init: pretrained`, the papers'
protocol: the untrained model with the `model.weights` encoder, written by the `init` stage), so with
`pretrained` this stage does not depend on the warmup. Every weight of the model (and of an EMA
teacher) comes from that file; parts a method adds beyond the model keep their own initialisation.

An epoch is one pass over the unlabeled tiles (`method: supervised` follows the same schedule on
labeled tiles only). Re-running after an interruption resumes from `--checkpoints/last.pt` when the
config and the init weights are unchanged. `--snapshots` is always written (with zero snapshots
when `train.snapshot_every` is 0), since dvc.yaml declares it as an output.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from s4seg.cli import run_stage
from s4seg.config import load_params
from s4seg.data.split import load_split
from s4seg.data.store import TileStore
from s4seg.engine.checkpoint import file_hash, read_model_file
from s4seg.engine.loop import PseudoLabelSnapshots, fit
from s4seg.errors import CheckpointError

log = logging.getLogger("s4seg.stages.train")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tiles", required=True)
    parser.add_argument("--split", required=True)
    parser.add_argument("--init", required=True, help="model to start from: models/warmup.pt or models/pretrained.pt")
    parser.add_argument("--out", required=True, help="model file to write (models/student.pt)")
    parser.add_argument("--log", required=True, help="per-step CSV (logs/train.csv)")
    parser.add_argument("--checkpoints", required=True, help="resume directory (checkpoints/train)")
    parser.add_argument("--snapshots", required=True, help="pseudo-label snapshots (dumps/snapshots.zarr)")
    return parser.parse_args(argv)


def load_init_weights(method: torch.nn.Module, init: str | Path) -> int:
    """Copy the init model's weights (warmup or pretrained) into `method.model` and its EMA teacher, if any.

    Returns the step the init model was saved at (0 for models/pretrained.pt, which is untrained)."""
    ckpt = read_model_file(init)
    prefix = "model."
    weights = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    targets = [method.model] + ([method.teacher()] if method.teacher() is not None else [])
    for target in targets:
        try:
            target.load_state_dict(weights)
        except RuntimeError as e:
            raise CheckpointError(f"{init}: its model does not match params.yaml `model` "
                                  f"(built with {ckpt['model_config']}); re-run the stage that wrote it: {e}") from e
    return int(ckpt.get("step", -1))


def check_init(init: str, path: str | Path, step: int) -> None:
    """`train.init` and the file given as --init agree: pretrained is the untrained model (step 0), warmup is not."""
    if (init == "pretrained") != (step == 0):
        expected = "an untrained model (step 0, models/pretrained.pt)" if init == "pretrained" \
            else "a trained warmup model (models/warmup.pt)"
        raise CheckpointError(f"{path}: a model saved at step {step}, but train.init is {init!r}, which expects "
                              f"{expected}; pass --init models/{init}.pt (dvc.yaml does)")


def open_snapshot_writer(path: str | Path, store: TileStore, unlabeled_ids: Sequence[int], count: int):
    """The pseudo-label snapshot writer of the evaluation package (an empty store when count is 0)."""
    from s4seg.evaluation.snapshots import SnapshotWriter, snapshot_tile_ids

    return SnapshotWriter(path, store, snapshot_tile_ids(unlabeled_ids, count))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_params(args.params)
    store = TileStore(args.tiles)
    split = load_split(args.split)

    import s4seg.methods  # noqa: F401  (registers the methods)
    from s4seg.engine.method import build_method
    from s4seg.models import build_model

    torch.manual_seed(params.train_seed)  # a new head's initialisation (the model's weights come from --init)
    model = build_model(params.model, store.num_classes, load_pretrained=False)  # weights come from --init
    method = build_method(params.method, params.method_config, model, store.num_classes)
    check_init(params.train.init, args.init, load_init_weights(method, args.init))
    log.info("train.init %s: %s starts from %s", params.train.init, params.method, args.init)

    cfg = params.train
    count = cfg.snapshot_tiles if cfg.snapshot_every > 0 else 0
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone writes snapshots
    writer_cm = open_snapshot_writer(args.snapshots, store, split.unlabeled, count) if main_rank \
        else contextlib.nullcontext(None)
    with writer_cm as writer:
        snapshots = PseudoLabelSnapshots(writer, store, writer.tile_ids) if count and main_rank else None
        fit(method, store, split, cfg, model_cfg=params.model, seed=params.train_seed, out_path=args.out,
            log_path=args.log, checkpoint_dir=args.checkpoints, snapshots=snapshots,
            identity={"init": file_hash(args.init)}, section="train", warm_start=params.train.init == "warmup")


if __name__ == "__main__":
    run_stage(main)
