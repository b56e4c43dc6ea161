"""DPT on a DINOv2 ViT: any input size, head shapes, encode/decode, parameter groups, official key layout."""

from __future__ import annotations

import pytest
import torch

from s4seg.config import ModelConfig
from s4seg.models import build_model
from s4seg.models.dpt import DPT, DPT_HEAD_CFGS, DPTHead
from s4seg.models.vit import VisionTransformer


@pytest.fixture(scope="module")
def tiny_dpt() -> DPT:
    torch.manual_seed(0)
    vit = VisionTransformer(dim=32, depth=4, num_heads=2, out_indices=(0, 1, 2, 3))
    return DPT(vit, num_classes=3, features=16, out_channels=(8, 16, 32, 32)).eval()


@pytest.mark.parametrize("size", [(30, 45), (28, 28), (70, 90), (5, 9)])
def test_any_input_size_gives_logits_of_that_size(tiny_dpt, size):
    with torch.no_grad():
        assert tiny_dpt(torch.rand(2, 3, *size)).shape == (2, 3, *size)


def test_vit_small_dpt_accepts_30x45():
    model = build_model(ModelConfig(arch="dpt", encoder="vit_small", weights=None), num_classes=4).eval()
    with torch.no_grad():
        feats = model.encode(torch.rand(1, 3, 30, 45))
        assert [tuple(f.shape) for f in feats] == [(1, 384, 2, 3)] * 4  # resized to 28 x 42
        assert model.decode(feats, (30, 45)).shape == (1, 4, 30, 45)


def test_head_resolutions(tiny_dpt):
    """Levels at x4, x2, x1, /2 (ceil) of the patch grid; logits at 8h x 8w (reference §2)."""
    seen = {}
    hooks = [
        getattr(tiny_dpt.head.scratch, f"layer{i}_rn").register_forward_hook(
            lambda m, i, o, k=i: seen.__setitem__(k, tuple(o.shape[-2:]))
        )
        for i in range(1, 5)
    ]
    feats = tiny_dpt.encode(torch.rand(1, 3, 70, 98))  # 5 x 7 patches
    with torch.no_grad():
        _, embedding = tiny_dpt.decode(feats, (70, 98), return_embedding=True)
    for hook in hooks:
        hook.remove()
    assert seen == {1: (20, 28), 2: (10, 14), 3: (5, 7), 4: (3, 4)}
    assert embedding.shape == (1, 16, 40, 56)


def test_encode_decode_equals_forward(tiny_dpt):
    x = torch.rand(2, 3, 30, 45)
    with torch.no_grad():
        logits = tiny_dpt(x)
        logits2, embedding = tiny_dpt.decode(tiny_dpt.encode(x), (30, 45), return_embedding=True)
    torch.testing.assert_close(logits2, logits)
    assert embedding.shape[:2] == (2, 16)


def test_param_groups_and_gradients(tiny_dpt):
    model = tiny_dpt.train()
    groups = model.param_groups()
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in groups["head"]} == {id(p) for p in model.head.parameters()}
    model.zero_grad()
    model(torch.rand(2, 3, 28, 28)).sum().backward()
    # every trainable parameter is used (DDP); mask_token exists only for the checkpoint layout
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    model.zero_grad()
    model.eval()


def test_freeze_encoder():
    model = build_model(ModelConfig(arch="dpt", encoder="vit_small", weights=None, freeze_encoder=True), 2)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def test_head_size_matches_the_official_count():
    """UniMatch V2 logs 10.95 M decoder params for ViT-B / 21 classes; ours lacks refinenet4's unused RCU."""
    with torch.device("meta"):
        head = DPTHead(768, 21, **DPT_HEAD_CFGS["vit_base"])
    unused_rcu = 2 * (128 * 128 * 9 + 128)
    assert sum(p.numel() for p in head.parameters()) + unused_rcu == pytest.approx(10.95e6, abs=0.005e6)


def test_official_checkpoint_layout_loads(tiny_dpt, tmp_path):
    """A UniMatch V2 checkpoint: DDP prefix, under 'model', with refinenet4's unused RCU1."""
    state = {f"module.{k}": v.clone() + 1 for k, v in tiny_dpt.state_dict().items()}
    state["module.head.scratch.refinenet4.resConfUnit1.conv1.weight"] = torch.zeros(16, 16, 3, 3)
    path = tmp_path / "latest.pth"
    torch.save({"model": state, "epoch": 3}, path)
    from s4seg.models.weights import load_weights

    fresh = DPT(VisionTransformer(32, 4, 2, (0, 1, 2, 3)), 3, 16, (8, 16, 32, 32))
    load_weights(fresh, str(path))
    torch.testing.assert_close(fresh.head.projects[0].weight, tiny_dpt.head.projects[0].weight + 1)
    torch.testing.assert_close(fresh.backbone.mask_token, tiny_dpt.backbone.mask_token + 1)
