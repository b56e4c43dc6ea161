"""DeepLabV3+ (Chen et al. 2018, arXiv 1802.02611) as used by UniMatch (reference/unimatch_v1_fixmatch.md §3.1).

ASPP on the high-level feature c4: a 1x1 branch, three 3x3 atrous branches (dilations from params,
doubled at output stride 8) and image pooling (global average -> 1x1 conv -> BN -> ReLU -> upsample);
every conv bias-free + BN + ReLU; the 5 x 256 channels are projected to 256. The low-level feature c1
is reduced to 48 channels (1x1), concatenated with the upsampled ASPP output, fused by two 3x3 convs
to 256, and a 1x1 classifier (with bias) gives the logits. No dropout. Every interpolation is bilinear
with align_corners=True. `channels` (256 in the paper; `model.decoder_channels`) sets the width of
ASPP and decoder: the two 3x3 convs at stride 4 cost most of a step on CPU (at 192 px, batch 8:
54 of 62 forward GFLOP on EfficientNet-Lite0), and 128 cuts them about 3.4x. Module names
(`backbone`, `head`, `reduce`, `fuse`, `classifier`) follow UniMatch's model, so its parameter
groups read the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s4seg.config import ModelConfig
from s4seg.errors import ParamsError
from s4seg.models.base import Encoder, Segmenter
from s4seg.models.registry import get_encoder, register_arch


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class ASPPPooling(nn.Module):
    """Image-level branch: global average -> 1x1 conv -> BN -> ReLU -> bilinear upsample."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = conv_bn_relu(in_ch, out_ch)

    def forward(self, x: Tensor) -> Tensor:
        # BN over (B, C, 1, 1) needs B > 1 in training, as in every DeepLabV3 implementation
        return F.interpolate(self.conv(self.pool(x)), size=x.shape[-2:], mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    def __init__(self, in_ch: int, dilations: Sequence[int], out_ch: int = 256) -> None:
        super().__init__()
        branches = [conv_bn_relu(in_ch, out_ch)]
        branches += [conv_bn_relu(in_ch, out_ch, 3, d) for d in dilations]
        branches.append(ASPPPooling(in_ch, out_ch))
        self.branches = nn.ModuleList(branches)
        self.project = conv_bn_relu(out_ch * len(branches), out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabV3Plus(Segmenter):
    def __init__(
        self,
        encoder: Encoder,
        num_classes: int,
        output_stride: int = 16,
        aspp_dilations: Sequence[int] = (6, 12, 18),
        channels: int = 256,
    ) -> None:
        super().__init__(encoder.mean, encoder.std)
        self.backbone = encoder
        low_ch, high_ch = encoder.channels[0], encoder.channels[-1]
        scale = 2 if output_stride == 8 else 1  # dilations are given at output stride 16
        self.head = ASPP(high_ch, [d * scale for d in aspp_dilations], channels)
        self.reduce = conv_bn_relu(low_ch, 48)
        self.fuse = nn.Sequential(conv_bn_relu(channels + 48, channels, 3), conv_bn_relu(channels, channels, 3))
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.embedding_dim = channels

    def encode(self, images: Tensor) -> list[Tensor]:
        """[c1 (stride 4), c4 (stride output_stride)] of the normalised images."""
        feats = self.backbone.forward_features(self.normalize(images))
        return [feats[0], feats[-1]]

    def decode(
        self, feats: list[Tensor], size: tuple[int, int], return_embedding: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        c1, c4 = feats
        high = F.interpolate(self.head(c4), size=c1.shape[-2:], mode="bilinear", align_corners=True)
        embedding = self.fuse(torch.cat([self.reduce(c1), high], dim=1))  # (B, channels, H/4, W/4)
        logits = F.interpolate(self.classifier(embedding), size=size, mode="bilinear", align_corners=True)
        return (logits, embedding) if return_embedding else logits


@register_arch("deeplabv3plus")
def deeplabv3plus(cfg: ModelConfig, num_classes: int) -> DeepLabV3Plus:
    """DeepLabV3+ on a CNN encoder (`model.encoder`), at `model.output_stride` (8 or 16)."""
    if cfg.output_stride not in (8, 16):
        raise ParamsError(f"model.output_stride: expected 8 or 16 for deeplabv3plus, found {cfg.output_stride}")
    entry = get_encoder(cfg.encoder, kind="cnn", arch=cfg.arch)
    encoder = entry.build(output_stride=cfg.output_stride, deep_stem=cfg.deep_stem)
    return DeepLabV3Plus(encoder, num_classes, cfg.output_stride, cfg.aspp_dilations, cfg.decoder_channels)
