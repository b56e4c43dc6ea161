"""Tiny model, toy semi-supervised method, tile store and split for the engine tests.

Also a command line (`python engine_helpers.py --store ... --out ...`) that runs `fit` in a separate
process, for the SIGKILL-resume and the two-process DDP tests.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s4seg.config import IGNORE_INDEX, ModelConfig, TrainConfig
from s4seg.data.split import Split
from s4seg.data.store import TileStore, TileStoreWriter
from s4seg.engine.method import Batch, Method, MethodConfig, PseudoLabels, StepOutput
from s4seg.models.base import Segmenter

CLASSES = ("red", "green", "blue")
PALETTE = ("#ff0000", "#00ff00", "#0000ff")


class TinySegmenter(Segmenter):
    """conv-BN-ReLU encoder, 1x1 classifier: enough to learn 'dominant colour' per pixel."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, num_classes, 1)

    def encode(self, images: Tensor) -> list[Tensor]:
        return [self.encoder(self.normalize(images))]

    def decode(self, feats: list[Tensor], size: tuple[int, int], return_embedding: bool = False):
        logits = self.head(feats[-1])
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return (logits, feats[-1]) if return_embedding else logits

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.encoder.parameters()), "head": list(self.head.parameters())}


class ToySemi(Method):
    """Unregistered FixMatch-like method with an EMA teacher and some torch-RNG use (dropout)."""

    name = "toy_semi"
    config_class = MethodConfig

    def __init__(self, cfg: MethodConfig, model: nn.Module, num_classes: int) -> None:
        super().__init__(cfg, model, num_classes)
        self.ema = copy.deepcopy(model)
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def teacher(self) -> nn.Module:
        return self.ema

    def ema_momentum(self) -> float:
        return 0.9

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor, valid: Tensor | None = None) -> PseudoLabels:
        conf, label = self.ema(images).softmax(1).max(1)
        keep = conf >= 0.4
        if valid is not None:
            keep &= valid.bool()
        return PseudoLabels(label=label, conf=conf, keep=keep)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        loss_x = F.cross_entropy(self.model(batch.x), batch.y, ignore_index=IGNORE_INDEX)
        pseudo = self.pseudo_labels(batch.u_w, batch.valid_u)
        feats = [F.dropout(f, 0.2) for f in self.model.encode(batch.u_s1)]  # consumes the torch RNG
        logits_s = self.model.decode(feats, tuple(batch.u_s1.shape[-2:]))
        ce = F.cross_entropy(logits_s, pseudo.label, reduction="none")
        loss_u = (ce * pseudo.keep).sum() / batch.valid_u.sum().clamp_min(1)
        return StepOutput(loss=(loss_x + loss_u) / 2, logs={"loss_x": loss_x.detach(), "loss_u": loss_u.detach()},
                          pseudo=pseudo)


def make_store(path: Path, num_tiles: int = 12, tile: int = 16, seed: int = 0) -> TileStore:
    """Random tiles whose mask is the dominant colour channel (some pixels void)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num_tiles, tile, tile, 3), dtype=np.uint8)
    masks = images.argmax(-1).astype(np.uint8)
    masks[:, :2, :2] = IGNORE_INDEX
    writer = TileStoreWriter(path, dataset="toy", classes=CLASSES, palette=PALETTE, tile_size=tile, stride=tile)
    offsets = np.stack([np.zeros(num_tiles), np.arange(num_tiles) * tile], axis=1)
    writer.add_scene("scene0", images, masks, offsets, height=tile, width=tile * num_tiles)
    writer.close()
    return TileStore(path)


def make_split(num_labeled: int = 3, num_unlabeled: int = 7, num_test: int = 2) -> Split:
    roles = ["labeled"] * num_labeled + ["unlabeled"] * num_unlabeled + ["test"] * num_test
    n = len(roles)
    return Split(pd.DataFrame({"id": np.arange(n), "scene": "scene0", "x": np.arange(n) * 16, "y": 0,
                               "role": roles, "ratio": 0.3, "seed": 0}))


def tiny_train_config(**overrides) -> TrainConfig:
    base = dict(iterations=6, batch_size=2, crop=12, scale_range=(0.75, 1.5), lr=0.05, checkpoint_every=2,
                log_every=1, device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


def build(method: str, seed: int = 0) -> Method:
    torch.manual_seed(seed)
    model = TinySegmenter(len(CLASSES))
    if method == "toy":
        return ToySemi(MethodConfig(), model, len(CLASSES))
    import s4seg.methods  # noqa: F401
    from s4seg.engine.method import build_method

    return build_method(method, {}, model, len(CLASSES))


class Sleepy:
    """Wraps a method's training_step with a sleep, so a subprocess can be killed mid-run."""

    def __init__(self, method: Method, seconds: float) -> None:
        original = method.training_step

        def slow_step(batch: Batch, step: int) -> StepOutput:
            time.sleep(seconds)
            return original(batch, step)

        method.training_step = slow_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--checkpoints", required=True)
    parser.add_argument("--method", default="toy")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--dump-weights", help="each rank saves its final state dict to this path + .rankN")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    from s4seg.engine.loop import fit

    method = build(args.method)
    if args.sleep:
        Sleepy(method, args.sleep)
    cfg = tiny_train_config(iterations=args.iterations, checkpoint_every=args.checkpoint_every, log_every=2)
    fit(method, TileStore(args.store), make_split(), cfg, model_cfg=ModelConfig(weights=None), seed=0,
        out_path=args.out, log_path=args.log, checkpoint_dir=args.checkpoints)
    if args.dump_weights:
        rank = os.environ.get("RANK", "0")
        torch.save(method.state_dict(), f"{args.dump_weights}.rank{rank}")


if __name__ == "__main__":
    main()
