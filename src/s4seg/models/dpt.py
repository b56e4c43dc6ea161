"""DPT (Ranftl et al. 2021) on a DINOv2 ViT, as UniMatch V2 uses it (reference/unimatch_v2.md §2).

Head, with h x w = the patch grid: per level a 1x1 projection (C -> out_channels[i], with bias); resize
x4 (transposed conv k4 s4), x2 (transposed conv k2 s2), identity, /2 (conv k3 s2 p1); `layerN_rn` 3x3
convs (no bias) to `features`; top-down fusion blocks (`refinenetN`: a + RCU1(b), RCU2, bilinear
resize with align_corners=True, 1x1 conv); `output_conv`: 3x3 conv, ReLU, 1x1 conv to the classes.
RCU(x) = x + conv3x3(ReLU(conv3x3(ReLU(x)))), biases on, no BN. Module names follow the official
model (`backbone`, `head.projects`, `head.resize_layers`, `head.scratch.*`).

Differences from the official code, on purpose: refinenet4 builds no `resConfUnit1` (the official
one owns it but never calls it: an unused parameter breaks DDP); its keys in an official checkpoint
are ignored on load. Inputs are resized inside the model to the nearest multiple of 14 (bilinear,
align_corners=True, at least one patch) so any input size works, and the head's logits (at 8h x 8w)
are resized in one step to the input size (the official code resizes to 14h x 14w, then the
evaluation resizes to the image size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from s4seg.config import ModelConfig
from s4seg.errors import ParamsError
from s4seg.models.base import Segmenter
from s4seg.models.registry import get_encoder, register_arch
from s4seg.models.vit import PATCH_SIZE, VisionTransformer, num_patches

# Head width and projection channels per encoder (reference/unimatch_v2.md §2 table).
DPT_HEAD_CFGS: dict[str, dict[str, object]] = {
    "vit_small": {"features": 64, "out_channels": (48, 96, 192, 384)},
    "vit_base": {"features": 128, "out_channels": (96, 192, 384, 768)},
    "vit_large": {"features": 256, "out_channels": (256, 512, 1024, 1024)},
}


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)
        self.act = nn.ReLU()  # not in-place: its input is also the residual

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.act(self.conv1(self.act(x))))


class FeatureFusionBlock(nn.Module):
    def __init__(self, features: int, has_skip: bool = True) -> None:
        super().__init__()
        if has_skip:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: Sequence[int] | None = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    def __init__(self, in_ch: int, num_classes: int, features: int, out_channels: Sequence[int]) -> None:
        super().__init__()
        self.projects = nn.ModuleList(nn.Conv2d(in_ch, oc, 1) for oc in out_channels)
        oc = out_channels
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(oc[0], oc[0], 4, stride=4),
                nn.ConvTranspose2d(oc[1], oc[1], 2, stride=2),
                nn.Identity(),
                nn.Conv2d(oc[3], oc[3], 3, stride=2, padding=1),
            ]
        )
        self.scratch = nn.Module()
        for i, c in enumerate(out_channels, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self.scratch, f"refinenet{i}", FeatureFusionBlock(features, has_skip=i != 4))
        self.scratch.output_conv = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1), nn.ReLU(), nn.Conv2d(features, num_classes, 1)
        )

    def forward(self, feats: list[Tensor], return_embedding: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        s = self.scratch
        levels = [
            resize(project(f)) for f, project, resize in zip(feats, self.projects, self.resize_layers, strict=True)
        ]
        l1, l2, l3, l4 = (getattr(s, f"layer{i}_rn")(x) for i, x in enumerate(levels, start=1))
        r4 = s.refinenet4(l4, size=l3.shape[-2:])
        r3 = s.refinenet3(r4, l3, size=l2.shape[-2:])
        r2 = s.refinenet2(r3, l2, size=l1.shape[-2:])
        r1 = s.refinenet1(r2, l1)
        embedding = s.output_conv[1](s.output_conv[0](r1))  # (B, features, 8h, 8w)
        logits = s.output_conv[2](embedding)
        return (logits, embedding) if return_embedding else logits


class DPT(Segmenter):
    ignored_checkpoint_keys = ("head.scratch.refinenet4.resConfUnit1.",)

    def __init__(
        self, encoder: VisionTransformer, num_classes: int, features: int, out_channels: Sequence[int]
    ) -> None:
        super().__init__(encoder.mean, encoder.std)
        self.backbone = encoder
        self.head = DPTHead(encoder.embed_dim, num_classes, features, out_channels)
        self.embedding_dim = features

    def encode(self, images: Tensor) -> list[Tensor]:
        """Four (B, C, h, w) token maps of the images resized to the nearest multiple of 14."""
        x = self.normalize(images)
        size = tuple(num_patches(n) * PATCH_SIZE for n in x.shape[-2:])
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.backbone.forward_features(x)

    def decode(
        self, feats: list[Tensor], size: tuple[int, int], return_embedding: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        out = self.head(feats, return_embedding=return_embedding)
        logits, embedding = out if return_embedding else (out, None)
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)
        return (logits, embedding) if return_embedding else logits


@register_arch("dpt")
def dpt(cfg: ModelConfig, num_classes: int) -> DPT:
    """DPT on a DINOv2 ViT (`model.encoder`: vit_small | vit_base | vit_large); output_stride does not apply."""
    entry = get_encoder(cfg.encoder, kind="vit", arch=cfg.arch)
    if cfg.deep_stem:
        raise ParamsError("model.deep_stem: true applies to ResNet encoders only; set it to false for dpt")
    head = DPT_HEAD_CFGS[cfg.encoder]
    return DPT(entry.build(), num_classes, head["features"], head["out_channels"])
