"""ResNet-18/50/101 encoders (He et al. 2016, torchvision's "v1.5": stride on the 3x3 conv).

Parameter names follow torchvision (`conv1`, `bn1`, `layer1.0.conv1`, ..., `layerN.0.downsample.{0,1}`,
`fc`), so a torchvision ImageNet state dict loads strictly. With `deep_stem` the 7x7 stem becomes
three 3x3 convs 3->64->64->128 as in UniMatch's ResNet (reference/unimatch_v1_fixmatch.md §3.2),
named `conv1.{0,3,6}` / `conv1.{1,4}` + `bn1` (128 ch), which is how UniMatch's pretrained
`resnet{50,101}.pth` files name them; layer1 then takes 128 channels and gets a projection shortcut.

Output stride 16 replaces the stride of layer4 by dilation 2, output stride 8 that of layer3 and
layer4 (dilation 2 and 4); the first block of a dilated layer keeps the previous dilation
(torchvision's convention). Features: c1..c4 = layer1..layer4 outputs (stride 4, 8, 8|16, 8|16|32).
"""

from __future__ import annotations

from torch import Tensor, nn

from s4seg.errors import ParamsError
from s4seg.models.base import IMAGENET_MEAN, IMAGENET_STD, Encoder
from s4seg.models.registry import register_encoder


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, in_ch: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, in_ch: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


def dilated_layers(output_stride: int) -> tuple[bool, bool, bool]:
    """Which of layer2, layer3, layer4 trade their stride for dilation to reach `output_stride`."""
    table = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}
    if output_stride not in table:
        raise ParamsError(f"model.output_stride: expected 8, 16 or 32, found {output_stride}")
    return table[output_stride]


class ResNet(Encoder):
    head_prefixes = ("fc.",)
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        output_stride: int = 32,
        deep_stem: bool = False,
        include_head: bool = False,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        if deep_stem:
            self.conv1 = nn.Sequential(
                conv3x3(3, 64, stride=2), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                conv3x3(64, 64), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                conv3x3(64, 128),
            )  # fmt: skip
            self.in_ch = 128
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.in_ch = 64
        self.bn1 = nn.BatchNorm2d(self.in_ch)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.dilation = 1
        dilate2, dilate3, dilate4 = dilated_layers(output_stride)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=dilate2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=dilate3)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=dilate4)
        self.channels = [64 * block.expansion, 128 * block.expansion, 256 * block.expansion, 512 * block.expansion]
        if include_head:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512 * block.expansion, num_classes)
        else:
            self.fc = None
        self._init_weights()

    def _make_layer(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or self.in_ch != out_ch:
            downsample = nn.Sequential(conv1x1(self.in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
        layers = [block(self.in_ch, planes, stride, previous_dilation, downsample)]
        self.in_ch = out_ch
        layers += [block(out_ch, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet logits (needs `include_head=True`)."""
        if self.fc is None:
            raise RuntimeError("this ResNet was built without its classifier (include_head=False)")
        return self.fc(self.avgpool(self.forward_features(x)[-1]).flatten(1))


# Weights are data: what each variant's pretrained file is and what normalisation it expects.
# s4seg never downloads; point `model.weights` at a local copy of one of these files.
PRETRAINED_CFGS = {
    "resnet18": {"file": "torchvision resnet18-f37072fd.pth (IMAGENET1K_V1)"},
    "resnet50": {"file": "torchvision resnet50 IMAGENET1K_V1/V2, or UniMatch's resnet50.pth (deep stem)"},
    "resnet101": {"file": "torchvision resnet101 IMAGENET1K_V1/V2, or UniMatch's resnet101.pth (deep stem)"},
}  # all expect ImageNet mean/std


@register_encoder("resnet18", kind="cnn")
def resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_encoder("resnet50", kind="cnn")
def resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_encoder("resnet101", kind="cnn")
def resnet101(**kwargs) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), **kwargs)
