"""ResNet encoders: torchvision naming and shapes, deep stem, dilation for output stride 8/16."""

from __future__ import annotations

import pytest
import torch

from s4seg.config import ModelConfig
from s4seg.errors import ParamsError
from s4seg.models import build_model
from s4seg.models.resnet import resnet18, resnet50, resnet101


def _bn(shapes: dict, name: str, ch: int) -> None:
    for suffix in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{name}.{suffix}"] = (ch,)
    shapes[f"{name}.num_batches_tracked"] = ()


def torchvision_resnet_shapes(bottleneck: bool, layers: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The state dict layout of torchvision's resnet18/50/101, written from its documented naming."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}
    _bn(shapes, "bn1", 64)
    in_ch = 64
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True), start=1):
        out_ch = planes * (4 if bottleneck else 1)
        for j in range(n):
            p = f"layer{li}.{j}"
            if bottleneck:
                convs = [(planes, in_ch, 1, 1), (planes, planes, 3, 3), (out_ch, planes, 1, 1)]
            else:
                convs = [(planes, in_ch, 3, 3), (planes, planes, 3, 3)]
            for k, shape in enumerate(convs, start=1):
                shapes[f"{p}.conv{k}.weight"] = shape
                _bn(shapes, f"{p}.bn{k}", shape[0])
            if j == 0 and (li > 1 or in_ch != out_ch):
                shapes[f"{p}.downsample.0.weight"] = (out_ch, in_ch, 1, 1)
                _bn(shapes, f"{p}.downsample.1", out_ch)
            in_ch = out_ch
    shapes["fc.weight"] = (1000, in_ch)
    shapes["fc.bias"] = (1000,)
    return shapes


def test_resnet18_state_dict_is_torchvision_layout():
    expected = torchvision_resnet_shapes(bottleneck=False, layers=(2, 2, 2, 2))
    assert len(expected) == 122  # torchvision resnet18().state_dict() has 122 entries
    got = {k: tuple(v.shape) for k, v in resnet18(include_head=True).state_dict().items()}
    assert got == expected


def test_resnet50_101_layout_and_size():
    with torch.device("meta"):  # no memory, no init cost: shapes and counts only
        r50 = resnet50(include_head=True)
        r101 = resnet101()
    expected50 = torchvision_resnet_shapes(bottleneck=True, layers=(3, 4, 6, 3))
    assert len(expected50) == 320
    assert {k: tuple(v.shape) for k, v in r50.state_dict().items()} == expected50
    assert sum(p.numel() for p in r50.parameters()) == 25_557_032  # torchvision's resnet50
    assert sum(p.numel() for p in r101.parameters()) == 44_549_160 - 2_049_000  # torchvision's resnet101 minus fc


def test_synthetic_torchvision_state_dict_loads_strictly(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {
        k: torch.randn(s, generator=gen) if s else torch.tensor(0)
        for k, s in torchvision_resnet_shapes(False, (2, 2, 2, 2)).items()
    }
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = build_model(ModelConfig(encoder="resnet18", weights=str(path)), num_classes=3)
    own = model.backbone.state_dict()
    assert "fc.weight" not in own  # the classifier is dropped for segmentation ...
    for key in ("conv1.weight", "layer3.0.downsample.0.weight", "layer4.1.bn2.running_var"):
        torch.testing.assert_close(own[key], state[key])  # ... every other tensor is loaded


def test_deep_stem_layout():
    enc = resnet50(deep_stem=True)
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert shapes["conv1.0.weight"] == (64, 3, 3, 3)
    assert shapes["conv1.3.weight"] == (64, 64, 3, 3)
    assert shapes["conv1.6.weight"] == (128, 64, 3, 3)
    assert shapes["conv1.1.running_mean"] == shapes["conv1.4.running_mean"] == (64,)
    assert shapes["bn1.weight"] == (128,)
    assert shapes["layer1.0.conv1.weight"] == (64, 128, 1, 1)
    assert shapes["layer1.0.downsample.0.weight"] == (256, 128, 1, 1)
    basic = resnet18(deep_stem=True)
    assert basic.layer1[0].downsample[0].weight.shape == (64, 128, 1, 1)  # BasicBlock needs a projection too
    with torch.no_grad():
        feats = basic.eval().forward_features(torch.rand(1, 3, 32, 32))
    assert [f.shape[-1] for f in feats] == [8, 4, 2, 1]


@pytest.mark.parametrize(
    ("output_stride", "sizes", "dilations3", "dilations4"),
    [
        (32, [16, 8, 4, 2], [1, 1], [1, 1]),
        (16, [16, 8, 4, 4], [1, 1], [1, 2]),  # first block of a dilated layer keeps the previous dilation
        (8, [16, 8, 8, 8], [1, 2], [2, 4]),
    ],
)
def test_output_stride_by_dilation(output_stride, sizes, dilations3, dilations4):
    enc = resnet18(output_stride=output_stride).eval()
    with torch.no_grad():
        feats = enc.forward_features(torch.rand(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == sizes
    assert [f.shape[1] for f in feats] == enc.channels == [64, 128, 256, 512]
    assert [b.conv2.dilation[0] for b in enc.layer3] == dilations3
    assert [b.conv2.dilation[0] for b in enc.layer4] == dilations4
    assert all(b.conv1.stride == (1, 1) for b in enc.layer4) == (output_stride < 32)


def test_bad_output_stride():
    with pytest.raises(ParamsError, match="model.output_stride: expected 8, 16 or 32, found 4"):
        resnet18(output_stride=4)


def test_classify_needs_head():
    with pytest.raises(RuntimeError, match="without its classifier"):
        resnet18().classify(torch.rand(1, 3, 32, 32))
    assert resnet18(include_head=True).eval().classify(torch.rand(1, 3, 32, 32)).shape == (1, 1000)
