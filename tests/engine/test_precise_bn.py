"""PreciseBN after training: BN statistics become the plain mean over the chosen training tiles."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from s4seg.config import ModelConfig
from s4seg.engine.loop import fit, validate
from s4seg.engine.precise_bn import batch_bounds, precise_bn_tiles, recompute_bn_stats
from s4seg.errors import ParamsError
from s4seg.models import build_model

sys.path.insert(0, str(Path(__file__).parent))
import engine_helpers as h  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return h.make_store(tmp_path_factory.mktemp("tiles") / "tiles.zarr")


def _images(store, ids) -> torch.Tensor:
    return torch.from_numpy(np.stack([store.image(i) for i in ids])).permute(0, 3, 1, 2).double() / 255.0


def test_tile_choice():
    split = h.make_split(num_labeled=3, num_unlabeled=7, num_test=2)
    assert precise_bn_tiles(split, "labeled") == [0, 1, 2]
    assert precise_bn_tiles(split, "all") == list(range(10))  # never a test tile
    assert precise_bn_tiles(split, "off") == []
    with pytest.raises(ParamsError, match=r"train\.precise_bn = 'test'"):
        validate(h.tiny_train_config(precise_bn="test"), "train")


def test_statistics_are_the_mean_over_batches(store):
    """A bare BN on the images: mean = mean of per-batch channel means, var = mean of unbiased batch vars."""
    net = nn.Sequential(nn.BatchNorm2d(3))
    net[0].running_mean.fill_(7.0)
    net.eval()
    ids = [0, 1, 2, 3, 4]
    assert recompute_bn_stats([net], store, ids, batch_size=2, device=torch.device("cpu")) == 1
    batches = [_images(store, ids[:2]), _images(store, ids[2:])]  # a last batch of one joins the previous
    mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    var = torch.stack([b.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(net[0].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[0].running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert not net.training  # mode restored
    assert net[0].momentum == 0.1  # momentum restored


def test_batch_bounds_never_leave_a_batch_of_one():
    assert batch_bounds(5, 2) == [(0, 2), (2, 5)]
    assert batch_bounds(6, 2) == [(0, 2), (2, 4), (4, 6)]
    assert batch_bounds(9, 8) == [(0, 9)]
    assert batch_bounds(1, 8) == [(0, 1)]


def test_bn_after_global_pooling(store):
    """DeepLabV3+'s ASPP image branch: BN on a 1 x 1 map, here with 3 tiles in batches of 2."""
    net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(3))
    assert recompute_bn_stats([net], store, [0, 1, 2], batch_size=2, device=torch.device("cpu")) == 1
    pooled = _images(store, [0, 1, 2]).mean(dim=(2, 3))
    torch.testing.assert_close(net[1].running_mean.double(), pooled.mean(0), rtol=1e-5, atol=1e-6)
    assert recompute_bn_stats([net], store, [0], batch_size=2, device=torch.device("cpu")) == 0  # skipped


def test_frozen_encoder_keeps_its_statistics(tmp_path):
    """A frozen encoder's BN stays in eval mode while training: PreciseBN leaves it, redoes the decoder."""
    store = h.make_store(tmp_path / "tiles.zarr", num_tiles=4, tile=32)
    model = build_model(ModelConfig(encoder="resnet18", weights=None, freeze_encoder=True), 3)
    for m in model.modules():  # distinctive statistics to detect a reset
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(0.3)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recompute_bn_stats([model], store, [0, 1, 2, 3], batch_size=2, device=torch.device("cpu")) == 1
    after = model.state_dict()
    stats = [k for k in before if k.endswith("running_mean")]
    encoder = [k for k in stats if k.startswith("backbone.")]
    decoder = [k for k in stats if not k.startswith("backbone.")]
    assert encoder and decoder
    assert all(torch.equal(before[k], after[k]) for k in encoder)
    assert all(not torch.equal(before[k], after[k]) for k in decoder)
    assert not model.training and not model.backbone.training


def test_no_batchnorm_or_no_tiles_is_a_no_op(store):
    conv = nn.Conv2d(3, 3, 1)
    before = conv.weight.clone()
    assert recompute_bn_stats([conv], store, [0, 1], batch_size=2, device=torch.device("cpu")) == 0
    assert torch.equal(conv.weight, before)
    bn = nn.BatchNorm2d(3)
    assert recompute_bn_stats([bn], store, [], batch_size=2, device=torch.device("cpu")) == 0
    assert torch.equal(bn.running_mean, torch.zeros(3))


def _fit(store, out: Path, precise_bn: str, result: dict | None = None):
    done = fit(h.build("toy"), store, h.make_split(), h.tiny_train_config(iterations=4, precise_bn=precise_bn),
        model_cfg=ModelConfig(weights=None), seed=0, out_path=out / "model.pt", log_path=out / "log.csv",
        checkpoint_dir=out / "ckpt")
    if result is not None:
        result.update(done)
    return torch.load(out / "model.pt", weights_only=True)["state_dict"]


def test_fit_recomputes_student_and_teacher_buffers_only(store, tmp_path):
    off = _fit(store, tmp_path / "off", "off")
    on = _fit(store, tmp_path / "all", "all")
    labeled = _fit(store, tmp_path / "labeled", "labeled")
    bn_stats = [k for k in off if k.endswith(("running_mean", "running_var"))]
    assert {k.split(".")[0] for k in bn_stats} == {"model", "ema"}  # student and teacher
    for k, v in off.items():
        if k in bn_stats:
            assert not torch.allclose(v, on[k]) and not torch.allclose(on[k], labeled[k]), k
        elif not k.endswith("num_batches_tracked"):
            assert torch.equal(v, on[k]), f"{k}: PreciseBN must not touch weights"
    # the buffers are exactly those of a recompute over all training tiles from the "off" weights
    net = h.TinySegmenter(len(h.CLASSES))
    net.load_state_dict({k[len("model."):]: v for k, v in off.items() if k.startswith("model.")})
    # in the precision training ran in (the artifact records it): PreciseBN runs under the training's runtime
    precision = torch.load(tmp_path / "all" / "model.pt", weights_only=True)["precision"]
    recompute_bn_stats([net], store, list(range(10)), batch_size=4, device=torch.device("cpu"), precision=precision)
    torch.testing.assert_close(net.encoder[1].running_mean, on["model.encoder.1.running_mean"])
    torch.testing.assert_close(net.encoder[1].running_var, on["model.encoder.1.running_var"])
