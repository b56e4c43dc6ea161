"""DINOv2-layout ViT: checkpoint key layout, sizes, position-embedding interpolation, intermediate maps."""

from __future__ import annotations

import pytest
import torch

from s4seg.models.vit import PRETRAIN_GRID, VisionTransformer, num_patches, vit_base, vit_large, vit_small


def dinov2_keys(depth: int) -> set[str]:
    """The key list of Meta's dinov2_vit*14_pretrain.pth, as documented in reference/unimatch_v2.md §6."""
    keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    keys |= {"norm.weight", "norm.bias"}
    per_block = [
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
        "mlp.fc2.bias", "ls2.gamma",
    ]  # fmt: skip
    return keys | {f"blocks.{i}.{k}" for i in range(depth) for k in per_block}


@pytest.fixture(scope="module")
def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(dim=32, depth=4, num_heads=2, out_indices=(0, 1, 2, 3)).eval()


@pytest.mark.parametrize(
    ("builder", "depth", "dim", "params", "out_indices"),
    [
        (vit_small, 12, 384, 22_056_576, (2, 5, 8, 11)),  # 22.1 M in UniMatch V2's logs
        (vit_base, 12, 768, 86_580_480, (2, 5, 8, 11)),  # 86.6 M
        (vit_large, 24, 1024, 304_368_640, (4, 11, 17, 23)),  # 304.4 M
    ],
)
def test_dinov2_layout_and_size(builder, depth, dim, params, out_indices):
    with torch.device("meta"):  # shapes and counts only
        vit = builder()
    state = vit.state_dict()
    assert set(state) == dinov2_keys(depth)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, dim)
    assert state["cls_token"].shape == (1, 1, dim)
    assert state["mask_token"].shape == (1, dim)
    assert state["blocks.0.ls1.gamma"].shape == (dim,)
    assert state["patch_embed.proj.weight"].shape == (dim, 3, 14, 14)
    assert state["blocks.0.mlp.fc1.weight"].shape == (4 * dim, dim)
    assert sum(p.numel() for p in vit.parameters()) == params
    assert vit.out_indices == out_indices


def test_mask_token_does_not_train():
    assert not vit_small().mask_token.requires_grad


def test_pos_embed_unchanged_on_the_pretraining_grid(tiny_vit):
    assert tiny_vit.interpolate_pos_embed(PRETRAIN_GRID, PRETRAIN_GRID) is tiny_vit.pos_embed


def cubic_resample_1d(values: torch.Tensor, n_out: int, scale: float, a: float = -0.75) -> torch.Tensor:
    """Brute-force bicubic (Keys kernel, a = -0.75, border samples clamped) with source index
    (i + 0.5) / scale - 0.5, what F.interpolate(scale_factor=scale, align_corners=False) computes."""

    def kernel(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

    out = []
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        base = int(torch.floor(torch.tensor(src)))
        acc = 0.0
        for k in range(-1, 3):
            acc += kernel(src - (base + k)) * float(values[min(max(base + k, 0), len(values) - 1)])
        out.append(acc)
    return torch.tensor(out)


def test_pos_embed_interpolation_follows_dinov2_scale_rule():
    """Rows and columns are resampled with DINOv2's scale factor (n + 0.1) / 37, not n / 37."""
    vit = VisionTransformer(dim=2, depth=1, num_heads=1, out_indices=(0,))
    gen = torch.Generator().manual_seed(0)
    row_profile = torch.randn(PRETRAIN_GRID, generator=gen)
    col_profile = torch.randn(PRETRAIN_GRID, generator=gen)
    with torch.no_grad():
        vit.pos_embed[0, 0] = torch.tensor([7.0, -7.0])  # cls
        vit.pos_embed[0, 1:, 0] = row_profile.repeat_interleave(PRETRAIN_GRID)  # channel 0 varies by row
        vit.pos_embed[0, 1:, 1] = col_profile.repeat(PRETRAIN_GRID)  # channel 1 varies by column
        h, w = 20, 50
        pos = vit.interpolate_pos_embed(h, w)
    assert pos.shape == (1, 1 + h * w, 2)
    torch.testing.assert_close(pos[0, 0], torch.tensor([7.0, -7.0]))
    grid = pos[0, 1:].reshape(h, w, 2)
    expected_rows = cubic_resample_1d(row_profile, h, (h + 0.1) / PRETRAIN_GRID)
    expected_cols = cubic_resample_1d(col_profile, w, (w + 0.1) / PRETRAIN_GRID)
    for j in (0, 17, w - 1):
        torch.testing.assert_close(grid[:, j, 0], expected_rows, atol=1e-4, rtol=0)
    for i in (0, h - 1):
        torch.testing.assert_close(grid[i, :, 1], expected_cols, atol=1e-4, rtol=0)
    plain = cubic_resample_1d(row_profile, h, h / PRETRAIN_GRID)  # the rule it must not follow
    assert (plain - expected_rows).abs().max() > 1e-2


def test_intermediate_maps_are_layer_normed_token_grids(tiny_vit):
    x = torch.rand(2, 3, 42, 28)
    with torch.no_grad():
        feats = tiny_vit.forward_features(x)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 3, 2)] * 4
    for f in feats:  # final LayerNorm (weight 1, bias 0 at init): zero mean, unit variance over channels
        torch.testing.assert_close(f.mean(dim=1), torch.zeros(2, 3, 2), atol=1e-5, rtol=0)
        torch.testing.assert_close(f.var(dim=1, unbiased=False), torch.ones(2, 3, 2), atol=1e-3, rtol=0)
    # the token of patch (row 1, col 0) is the map's [1, 0]: compare with a direct pass through block 0
    with torch.no_grad():
        tokens = torch.cat([tiny_vit.cls_token.expand(2, -1, -1), tiny_vit.patch_embed(x)], dim=1)
        tokens = tiny_vit.blocks[0](tokens + tiny_vit.interpolate_pos_embed(3, 2))
        torch.testing.assert_close(feats[0][:, :, 1, 0], tiny_vit.norm(tokens)[:, 1 + 1 * 2 + 0])


def test_input_must_be_a_multiple_of_the_patch(tiny_vit):
    with pytest.raises(ValueError, match="30x45 is not a multiple of the patch size 14"):
        tiny_vit.forward_features(torch.rand(1, 3, 30, 45))


@pytest.mark.parametrize(("size", "patches"), [(30, 2), (45, 3), (28, 2), (20, 1), (21, 2), (3, 1)])
def test_num_patches_rounds_half_up(size, patches):
    assert num_patches(size) == patches


def test_bad_out_indices():
    with pytest.raises(ValueError, match="increasing block indices in 0..3"):
        VisionTransformer(dim=8, depth=4, num_heads=1, out_indices=(0, 4))
