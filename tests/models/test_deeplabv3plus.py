"""DeepLabV3+: output shapes for every CNN encoder, encode/decode = forward, parameter groups, freezing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from s4seg.config import ModelConfig
from s4seg.models import build_model, encoder_names
from s4seg.models.deeplabv3plus import DeepLabV3Plus


def small_model(encoder: str = "efficientnet_lite0", **kwargs) -> DeepLabV3Plus:
    torch.manual_seed(0)
    return build_model(ModelConfig(encoder=encoder, weights=None, **kwargs), num_classes=3)


def test_every_cnn_encoder_is_covered():
    assert encoder_names("cnn") == ["efficientnet_lite0", "resnet101", "resnet18", "resnet50"]


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize(
    "encoder",
    ["efficientnet_lite0", "resnet18", pytest.param("resnet50", marks=pytest.mark.slow),
     pytest.param("resnet101", marks=pytest.mark.slow)],
)  # fmt: skip
def test_logits_have_the_input_size(encoder, output_stride):
    model = small_model(encoder, output_stride=output_stride).eval()
    with torch.no_grad():
        for h, w in [(64, 64), (70, 90)]:
            c1, c4 = model.encode(torch.rand(2, 3, h, w))
            assert c1.shape[-2:] == (-(-h // 4), -(-w // 4))
            assert c4.shape[-1] == -(-w // output_stride)
            assert model(torch.rand(2, 3, h, w)).shape == (2, 3, h, w)


def test_aspp_dilations_double_at_output_stride_8():
    def dilations(m: DeepLabV3Plus) -> list[int]:
        return [b[0].dilation[0] for b in m.head.branches[1:-1]]  # between the 1x1 and the pooling branch

    assert dilations(small_model(output_stride=16)) == [6, 12, 18]
    assert dilations(small_model(output_stride=8)) == [12, 24, 36]
    assert dilations(small_model(output_stride=16, aspp_dilations=(3, 5))) == [3, 5]


def test_encode_decode_equals_forward_and_embedding_feeds_the_classifier():
    model = small_model().eval()
    x = torch.rand(2, 3, 48, 40)
    with torch.no_grad():
        logits = model(x)
        feats = model.encode(x)
        logits2, embedding = model.decode(feats, (48, 40), return_embedding=True)
    torch.testing.assert_close(logits2, logits)
    assert embedding.shape == (2, 256, 12, 10)  # stride 4, before the classifier
    again = F.interpolate(model.classifier(embedding), size=(48, 40), mode="bilinear", align_corners=True)
    torch.testing.assert_close(again, logits)


def test_normalisation_is_inside_the_model():
    model = small_model().eval()
    assert model.mean.flatten().tolist() == [0.5, 0.5, 0.5]  # EfficientNet-Lite's inputs are in [-1, 1]
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        direct = model.backbone.forward_features(x * 2 - 1)[-1]
        torch.testing.assert_close(model.encode(x)[1], direct)
    assert small_model("resnet18").mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_param_groups_partition_every_parameter_once():
    model = small_model()
    groups = model.param_groups()
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in groups["backbone"]} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in groups["head"]} >= {id(p) for p in model.classifier.parameters()}


def test_every_parameter_gets_a_gradient():
    """No unused parameter (DDP with find_unused_parameters=False needs this)."""
    model = small_model("resnet18").train()
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_freeze_encoder():
    model = small_model(freeze_encoder=True)
    model.train()
    assert not model.backbone.training and model.head.training  # frozen BN statistics
    before = model.backbone._bn0.running_mean.clone()
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.param_groups()["head"])
    torch.testing.assert_close(model.backbone._bn0.running_mean, before)


def test_decoder_channels_set_aspp_and_decoder_width():
    model = small_model(decoder_channels=64).eval()
    assert model.head.project[0].out_channels == 64 and model.fuse[1][0].in_channels == 64
    with torch.no_grad():
        logits, embedding = model.decode(model.encode(torch.rand(1, 3, 32, 32)), (32, 32), return_embedding=True)
    assert embedding.shape == (1, 64, 8, 8) and logits.shape == (1, 3, 32, 32)
