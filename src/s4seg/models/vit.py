"""DINOv2-layout Vision Transformer encoders (Oquab et al. 2023) for UniMatch V2's DPT model.

Facts in reference/unimatch_v2.md §2 and §6: patch 14, a 37x37 position-embedding grid (+ cls) for
518-px pretraining, LayerScale, LayerNorm eps 1e-6, qkv bias, GELU MLP ratio 4, no register tokens,
no drop-path. Module names match Meta's `dinov2_vit{s,b,l}14_pretrain.pth` (`cls_token`, `pos_embed`,
`mask_token`, `patch_embed.proj`, `blocks.i.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,
ls2.gamma}`, `norm`), so those files load strictly. `mask_token` is kept only for that reason: it is
never used, so it does not require grad (an unused trainable parameter would break DDP).

Other grid sizes interpolate the position embeddings bicubically (no antialias) with DINOv2's
scale-factor rule ((n + 0.1) / 37). `forward_features` returns the outputs of four blocks after the
final LayerNorm, without the cls token, as (B, C, h, w) maps. Images must be a multiple of 14 here;
the DPT model resizes its inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s4seg.models.base import IMAGENET_MEAN, IMAGENET_STD, Encoder
from s4seg.models.registry import register_encoder

PATCH_SIZE = 14
PRETRAIN_GRID = 37  # 518 / 14
LN_EPS = 1e-6
POS_INTERP_OFFSET = 0.1  # DINOv2's offset, avoids a floating-point error in the scale factor


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch_size: int = PATCH_SIZE) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, C)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1.0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(Encoder):
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    patch_size = PATCH_SIZE

    def __init__(self, dim: int, depth: int, num_heads: int, out_indices: tuple[int, ...]) -> None:
        super().__init__()
        if list(out_indices) != sorted(set(out_indices)) or not all(0 <= i < depth for i in out_indices):
            raise ValueError(f"out_indices {out_indices}: expected increasing block indices in 0..{depth - 1}")
        self.embed_dim = dim
        self.out_indices = tuple(out_indices)
        self.channels = [dim] * len(out_indices)
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + PRETRAIN_GRID**2, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim), requires_grad=False)  # checkpoint layout only
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_embed(self, h: int, w: int) -> Tensor:
        """Position embeddings (1, 1 + h*w, C) for an h x w patch grid."""
        if (h, w) == (PRETRAIN_GRID, PRETRAIN_GRID):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = patch_pos.reshape(1, PRETRAIN_GRID, PRETRAIN_GRID, -1).permute(0, 3, 1, 2).float()
        scale = ((h + POS_INTERP_OFFSET) / PRETRAIN_GRID, (w + POS_INTERP_OFFSET) / PRETRAIN_GRID)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        assert grid.shape[-2:] == (h, w), grid.shape
        patch_pos = grid.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        b, _, height, width = x.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"ViT input {height}x{width} is not a multiple of the patch size {self.patch_size}")
        h, w = height // self.patch_size, width // self.patch_size
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(x)], dim=1)
        tokens = tokens + self.interpolate_pos_embed(h, w)
        feats = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in self.out_indices:
                feats.append(self.norm(tokens)[:, 1:].transpose(1, 2).reshape(b, -1, h, w))
                if len(feats) == len(self.out_indices):
                    break  # later blocks feed nothing
        return feats


def num_patches(size: int) -> int:
    """Patches along a side of `size` px after resizing to the nearest multiple of 14 (at least one)."""
    return max(1, math.floor(size / PATCH_SIZE + 0.5))


# Weights are data: Meta's DINOv2 files, used as plain state dicts (reference/unimatch_v2.md §6).
PRETRAINED_CFGS = {
    "vit_small": {"file": "dinov2_vits14_pretrain.pth", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "vit_base": {"file": "dinov2_vitb14_pretrain.pth", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "vit_large": {"file": "dinov2_vitl14_pretrain.pth", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
}


# Intermediate blocks (0-based) as UniMatch V2 takes them (reference/unimatch_v2.md §2).
@register_encoder("vit_small", kind="vit")
def vit_small(out_indices: tuple[int, ...] = (2, 5, 8, 11)) -> VisionTransformer:
    return VisionTransformer(384, 12, 6, out_indices)


@register_encoder("vit_base", kind="vit")
def vit_base(out_indices: tuple[int, ...] = (2, 5, 8, 11)) -> VisionTransformer:
    return VisionTransformer(768, 12, 12, out_indices)


@register_encoder("vit_large", kind="vit")
def vit_large(out_indices: tuple[int, ...] = (4, 11, 17, 23)) -> VisionTransformer:
    return VisionTransformer(1024, 24, 16, out_indices)
