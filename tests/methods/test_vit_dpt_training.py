"""Every method trains on the ViT + DPT model (UniMatch V2's) through the real engine, as on DeepLabV3+.

ViT-S/14 at random init on 28 x 28 tiles (a 2 x 2 patch grid), two optimiser steps with `fit`: the run
finishes with finite losses, the weights move (the encoder stays put with `freeze_encoder`), and the
artifact rebuilds with `load_method` and predicts full-size logits.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch

import s4seg.methods  # noqa: F401  (fills the registry)
from s4seg.config import ModelConfig, load_params
from s4seg.engine.checkpoint import load_method
from s4seg.engine.loop import fit
from s4seg.engine.method import build_method, registered_methods
from s4seg.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
import engine_helpers as h  # noqa: E402

PARAMS = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
TILE = 28


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return h.make_store(tmp_path_factory.mktemp("tiles") / "tiles.zarr", tile=TILE)


def _train(name: str, store, out: Path, freeze_encoder: bool = False):
    model_cfg = ModelConfig(arch="dpt", encoder="vit_small", weights=None, freeze_encoder=freeze_encoder)
    torch.manual_seed(0)
    method = build_method(name, PARAMS.methods.get(name), build_model(model_cfg, len(h.CLASSES)), len(h.CLASSES))
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    cfg = h.tiny_train_config(iterations=2, crop=TILE, scale_range=(1.0, 1.0), optimizer="adamw", lr=1e-4)
    fit(method, store, h.make_split(), cfg, model_cfg=model_cfg, seed=0, out_path=out / "model.pt",
        log_path=out / "log.csv", checkpoint_dir=out / "ckpt")
    return before, method


@pytest.mark.parametrize("name", registered_methods())
def test_method_trains_on_vit_dpt(name, store, tmp_path):
    before, method = _train(name, store, tmp_path)
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    after = method.model.state_dict()
    assert not torch.equal(before["backbone.blocks.0.attn.qkv.weight"], after["backbone.blocks.0.attn.qkv.weight"])
    assert not torch.equal(before["head.scratch.output_conv.2.weight"], after["head.scratch.output_conv.2.weight"])
    loaded = load_method(tmp_path / "model.pt")
    assert loaded.name == name
    with torch.no_grad():
        assert loaded.predict(torch.rand(1, 3, 30, 45)).shape == (1, len(h.CLASSES), 30, 45)


def test_frozen_encoder_trains_the_head_only(store, tmp_path):
    before, method = _train("unimatch_v2", store, tmp_path, freeze_encoder=True)
    after = method.model.state_dict()
    encoder = [k for k in before if k.startswith("backbone.")]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert not torch.equal(before["head.scratch.output_conv.2.weight"], after["head.scratch.output_conv.2.weight"])
